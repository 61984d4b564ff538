"""Settings of ``losa bench``, ``losa eval``, ``losa generate`` and ``losa serve`` (validated when built:
``core/config.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from ..core.atomic import existing_output, output_problem
from ..core.config import AUTO_ENCODING, DEFAULT_MODEL, Device, DType, check_encoding, choice, choices, raise_problems
from ..core.errors import key
from .onnx_io import DEFAULT_OPSET


class Engine(StrEnum):
    """A CPU engine ``losa bench`` times: ONNX Runtime and DeepSparse run exported graphs, ``losa`` runs
    the model folder on losa's own sparse kernel (``losa_engine.py``)."""

    ONNXRUNTIME = "onnxruntime"
    DEEPSPARSE = "deepsparse"
    LOSA = "losa"


class Precision(StrEnum):
    """Weight precision of a bench row (bf16: the losa engine only; the ONNX engines run fp32 and int8)."""

    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "int8"


class Kernel(StrEnum):
    """``losa generate``: the packed value format of the block linears on losa's kernel, or off (dense PyTorch)."""

    OFF = "off"
    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "int8"


#: what the losa engine and ``losa generate`` run per precision: the packed value type (``kernels/packed.py``) of
#: the blocks' linears, and of the head (which has no zeros, so the kernel stores it in its dense layout); int8
#: multiplies int8 activations
LOSA_FORMATS = {Precision.FP32: ("float32", "float32"), Precision.BF16: ("bfloat16", "bfloat16"),
                Precision.INT8: ("int8", "int8")}


@dataclass
class BenchConfig:
    """Settings of ``losa bench``."""

    model: str = ""
    dense_baseline: str | None = None
    engines: list[Engine] = field(default_factory=lambda: list(Engine))
    batch: int = 1
    seqlen: int = 128
    decode_tokens: int = 16
    threads: int | None = None
    warmup: int = 2
    iterations: int = 10
    report: str | None = None
    force: bool = False
    opset: int = DEFAULT_OPSET
    timeout_s: float = 3600.0
    trust_remote_code: bool = False
    precisions: list[Precision] = field(default_factory=lambda: [Precision.FP32])
    compile: bool = False  # the losa engine's models under torch.compile
    #: text to measure each format's perplexity and top-1 agreement on (bench_accuracy.py); None: speed only
    data: str | None = None
    data_seqlen: int = 512
    data_windows: int = 32
    encoding: str = AUTO_ENCODING

    def __post_init__(self) -> None:
        found: list[str] = []
        self.engines = choices(self.engines, Engine, "engines", found)
        self.precisions = choices(self.precisions, Precision, "precisions", found)
        if not self.model:
            found.append("give a model folder, an export folder or a .onnx file to benchmark")
        for name, value, low in (("batch", self.batch, 1), ("seqlen", self.seqlen, 1),
                                 ("decode_tokens", self.decode_tokens, 0), ("warmup", self.warmup, 0),
                                 ("iterations", self.iterations, 1)):
            if value < low:
                found.append(f"{key(name)} must be at least {low}, got {value}")
        if self.threads is not None and self.threads < 1:
            found.append(f"{key('threads')} must be at least 1, got {self.threads}")
        if self.report is not None and not self.report.lower().endswith(".png"):
            found.append(f"{key('report')} {self.report}: give a .png file name")
        elif self.report is not None:  # before any export or timing: a refused report must not cost minutes
            report = Path(self.report).expanduser().resolve()
            problem = (output_problem(report, option=key("report"))
                       or existing_output(report, self.report, self.force, key("report"), folder=False))
            if problem:
                found.append(problem)
        if self.timeout_s <= 0:
            found.append(f"timeout must be positive, got {self.timeout_s}")
        if self.data_seqlen < 2 or self.data_windows < 1:
            found.append(f"{key('data_seqlen')} must be at least 2 and {key('data_windows')} at least 1, got "
                         f"{self.data_seqlen} and {self.data_windows}")
        found += check_encoding(self.encoding)
        raise_problems(found)


@dataclass
class EvalConfig:
    """Settings of ``losa eval``."""

    model: str = DEFAULT_MODEL
    data: str | None = None
    seqlen: int = 2048
    max_windows: int | None = None
    dtype: DType = DType.FLOAT32
    device: Device = Device.AUTO
    batch_size: int = 1
    sparsity: bool = False
    trust_remote_code: bool = False
    tokenizer: str | None = None
    tasks: list[str] | None = None  # lm-eval task names or local .jsonl files (zeroshot.py)
    num_fewshot: int = 0
    limit: int | None = None
    encoding: str = AUTO_ENCODING

    def __post_init__(self) -> None:
        found = check_encoding(self.encoding)
        self.dtype = choice(self.dtype, DType, "dtype", found)
        self.device = choice(self.device, Device, "device", found)
        if self.data is None and not self.sparsity and self.tasks is None:
            found.append(f"give {key('data')} FILE for perplexity, {key('tasks')} for multiple-choice accuracy, "
                         f"or {key('sparsity')} to count zeros")
        if self.tasks is not None and (not self.tasks or not all(name.strip() for name in self.tasks)):
            found.append(f"{key('tasks')} needs comma-separated lm-eval task names or .jsonl files, "
                         f"e.g. {key('tasks')} arc_easy,my_task.jsonl")
        if self.num_fewshot < 0:
            found.append(f"{key('num_fewshot')} must be at least 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit < 1:
            found.append(f"{key('limit')} must be at least 1, got {self.limit}")
        if self.tasks is None and (self.num_fewshot or self.limit is not None):
            found.append(f"{key('num_fewshot')} and {key('limit')} apply to {key('tasks')} only")
        if self.seqlen < 2:
            found.append(f"{key('seqlen')} must be at least 2, got {self.seqlen}")
        if self.max_windows is not None and self.max_windows < 1:
            found.append(f"{key('max_windows')} must be at least 1, got {self.max_windows}")
        if self.batch_size < 1:
            found.append(f"{key('batch_size')} must be at least 1, got {self.batch_size}")
        raise_problems(found)


@dataclass
class GenerateConfig:
    """Settings of ``losa generate``."""

    model: str = ""
    prompt: str = ""
    max_new_tokens: int = 64
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    kernel: Kernel = Kernel.FP32
    threads: int | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        found: list[str] = []
        self.kernel = choice(self.kernel, Kernel, "kernel", found)
        if not self.prompt:
            found.append(f"{key('prompt')} is required: the text to continue")
        if self.max_new_tokens < 1:
            found.append(f"{key('max_new_tokens')} must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            found.append(f"{key('temperature')} must be a positive number, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            found.append(f"{key('top_p')} must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**32:
            found.append(f"{key('seed')} must be in [0, 2**32), got {self.seed}")
        ignored = [key(name) for name in ("temperature", "top_p", "seed")
                   if getattr(self, name) != getattr(GenerateConfig, name)]
        if ignored and not self.sample:  # greedy decoding would silently ignore them
            verb, them = ("apply", "them") if len(ignored) > 1 else ("applies", "it")
            found.append(f"{', '.join(ignored)} {verb} to sampling only: add {key('sample')}, or drop {them} for "
                         "greedy decoding")
        if self.threads is not None and self.threads < 1:
            found.append(f"{key('threads')} must be at least 1, got {self.threads}")
        raise_problems(found)


@dataclass
class ServeConfig:
    """Settings of ``losa serve`` (the limits that need the model, its context, are checked once it is loaded)."""

    model: str = ""
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the server reports the one it bound)
    kernel: Kernel = Kernel.INT8
    threads: int | None = None
    model_name: str | None = None  # the id clients send as "model"; default the model folder's name
    max_prompt_tokens: int | None = None  # default: the model's context less one (room for one new token)
    max_tokens: int | None = None  # cap on a request's max_tokens; default: the model's context less one
    max_queue: int = 32  # requests waiting behind the one generating; more get 503
    max_body_bytes: int = 1 << 20  # a request body over this is refused (413) before it is read whole
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        found: list[str] = []
        self.kernel = choice(self.kernel, Kernel, "kernel", found)
        if not self.model:
            found.append("give the model folder to serve")
        if not self.host:
            found.append(f"{key('host')} must name an address to listen on, e.g. 127.0.0.1")
        if not 0 <= self.port <= 65535:
            found.append(f"{key('port')} must be in 0..65535 (0: any free port), got {self.port}")
        for name, value in (("threads", self.threads), ("max_prompt_tokens", self.max_prompt_tokens),
                            ("max_tokens", self.max_tokens)):
            if value is not None and value < 1:
                found.append(f"{key(name)} must be at least 1, got {value}")
        if self.max_body_bytes < 1:
            found.append(f"{key('max_body_bytes')} must be at least 1, got {self.max_body_bytes}")
        if self.max_queue < 0:
            found.append(f"{key('max_queue')} must be at least 0, got {self.max_queue}")
        if self.model_name is not None and not self.model_name.strip():
            found.append(f"{key('model_name')} must not be blank")
        raise_problems(found)
