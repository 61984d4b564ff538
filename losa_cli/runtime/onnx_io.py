"""Reading exported ONNX graphs: their description, ONNX Runtime sessions, and what their weights hold.

``losa export --onnx`` writes two graphs and a sidecar describing them (``export/onnx_graphs.py``):

* ``prefill.onnx``: ``input_ids``, ``attention_mask`` -> ``logits`` (and ``present.{i}.key/value``
  when the decode graph is supported, so generation can start from a prefill);
* ``decode.onnx``: ``input_ids`` (new tokens), ``attention_mask`` (past + new), and
  ``past_key_values.{i}.key/value`` -> ``logits`` and ``present.{i}.key/value``;
  every layer's past holds every past token, the layers of a sliding-window model too (the graph
  hides what lies outside their window with the model's own mask), so a feeder passes each
  ``present`` back as the next ``past`` unchanged and never crops it;
* ``losa_onnx.json``: the ``GraphSpec`` below.

Everything that *reads* such a folder lives here, below export: the bench times the graphs, eval
scores them, and export verifies what it wrote through the same sessions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError, ModelError

DEFAULT_OPSET = 17
#: the highest opset DeepSparse 1.8.0 compiles (it rejects 19 and 20)
DEEPSPARSE_MAX_OPSET = 17
PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
SIDECAR_FILE = "losa_onnx.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class GraphSpec:
    """What a bench needs to feed a graph set: names, KV layout and which dims are fixed."""

    prefill: str
    decode: str | None
    num_layers: int
    kv_heads: int | None
    head_dim: int | None
    vocab_size: int
    batch: int | None
    seqlen: int | None
    opset: int
    external_data: bool
    model_type: str
    precision: str = "fp32"
    #: positions a sliding-window layer attends to (None: every layer sees all).  Feeders need not read it:
    #: the graphs take every layer's whole past and apply the window themselves; verification sizes its prompts by it
    sliding_window: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_onnx_environment(opset: int) -> dict[str, str]:
    """Fail before any work when onnx/onnxruntime are missing or cannot hold ``opset``."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(
            f"--onnx needs onnx and onnxruntime ({exc.name} is missing): pip install 'losa[onnx]'"
        ) from None
    supported = onnx.defs.onnx_opset_version()
    if opset > supported:
        raise ConfigError(
            f"--opset {opset} is above what the installed onnx {onnx.__version__} supports ({supported}); "
            f"use --opset {min(supported, DEFAULT_OPSET)}"
        )
    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "max_opset": str(supported)}


def write_graph_spec(folder: Path, spec: GraphSpec) -> None:
    """The sidecar ``read_graph_spec`` reads (written by export, beside the graphs)."""
    (folder / SIDECAR_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")


def read_graph_spec(folder: Path) -> GraphSpec | None:
    """The sidecar written by ``losa export --onnx``, or None for a folder without one."""
    path = folder / SIDECAR_FILE
    if not path.is_file():
        return None
    try:
        return GraphSpec(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise ModelError(f"{path} is not a valid losa ONNX description ({exc}); re-run losa export --onnx") from None


def spec_from_graph(path: Path) -> GraphSpec:
    """Describe a bare ONNX file (no sidecar) from its inputs: prefill only unless it takes a past."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ModelError(f"{path} is not a readable ONNX file ({type(exc).__name__}); "
                         "export it again with losa export --onnx") from exc
    names = [i.name for i in proto.graph.input]
    if "input_ids" not in names:
        raise ModelError(
            f"{path} has no input_ids input; losa bench runs causal LM graphs (export with losa export --onnx)"
        )
    if any(n.startswith("past_key_values") for n in names):
        raise ModelError(f"{path} is a decode graph; give the prefill graph or the export folder holding both")
    dims = proto.graph.input[names.index("input_ids")].type.tensor_type.shape.dim
    fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    logits = next((o for o in proto.graph.output if o.name == "logits"), proto.graph.output[0])
    vocab_dim = logits.type.tensor_type.shape.dim[-1]
    vocab = vocab_dim.dim_value if vocab_dim.HasField("dim_value") else 32000
    return GraphSpec(
        prefill=path.name,
        decode=None,
        num_layers=0,
        kv_heads=None,
        head_dim=None,
        vocab_size=int(vocab),
        batch=fixed[0] if fixed else None,
        seqlen=fixed[1] if len(fixed) > 1 else None,
        opset=max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0),
        external_data=any(i.data_location == 1 for i in proto.graph.initializer),
        model_type="?",
    )


def onnx_prefill_graph(spec: str) -> Path | None:
    """The prefill graph named by ``spec`` (a .onnx file, or an ``onnx``/``onnx-int8`` folder), else None.

    An export folder itself names its safetensors model, which stays the PyTorch path.
    """
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".onnx":
        return path
    if path.is_dir() and (path / SIDECAR_FILE).is_file():
        return path / read_graph_spec(path).prefill
    return None


def tokenizer_folder(graph: Path, given: str | None) -> str:
    """Where the tokenizer is: ``given``, else the graph's folder or the export folder above it."""
    if given:
        return given
    for folder in (graph.parent, graph.parent.parent):
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return str(folder)
    raise ConfigError(
        f"no tokenizer beside {graph}: give --tokenizer MODEL_DIR (the model the graph was exported from)"
    )


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """``{prefix}.{i}.key``, ``{prefix}.{i}.value`` for every layer, in the graphs' order."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def ort_session(path: Path, threads: int = 1):
    """An ONNX Runtime CPU session (external data is found beside the file)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_greedy(prefill, decode, input_ids: np.ndarray, steps: int, num_layers: int) -> np.ndarray:
    """Greedy generation through the prefill graph then ``steps - 1`` decode-graph calls.

    Returns the ``steps`` new token ids per row (batch, steps); no padding, no EOS stop.
    """
    mask = np.ones_like(input_ids)
    outputs = prefill.run(None, {"input_ids": input_ids, "attention_mask": mask})
    logits, past = outputs[0], outputs[1:]
    tokens = [logits[:, -1].argmax(-1)]
    past_names = kv_names(num_layers, "past_key_values")
    for _ in range(steps - 1):
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], axis=1)
        feed = {
            "input_ids": tokens[-1][:, None].astype(np.int64),
            "attention_mask": mask,
            **dict(zip(past_names, past)),
        }
        outputs = decode.run(None, feed)
        logits, past = outputs[0], outputs[1:]
        tokens.append(logits[:, -1].argmax(-1))
    return np.stack(tokens, axis=1)


def onnx_matmul_weights(path: Path) -> dict[str, np.ndarray]:
    """2-D float initializers that feed a MatMul or Gemm: the linear weights as the engines see them."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=True)
    consumers = {name for node in proto.graph.node if node.op_type in ("MatMul", "Gemm") for name in node.input}
    return {
        init.name: numpy_helper.to_array(init)
        for init in proto.graph.initializer
        if init.name in consumers and len(init.dims) == 2 and init.data_type in (1, 10, 16)
    }


def weight_sparsity(paths: Sequence[Path]) -> float:
    """Zero fraction over the MatMul/Gemm weights of the first graph (all graphs share weights)."""
    weights = onnx_matmul_weights(paths[0])
    total = sum(a.size for a in weights.values())
    zeros = sum(int(np.count_nonzero(a == 0)) for a in weights.values())
    return zeros / total if total else 0.0


def external_files(graph: Path) -> set[str]:
    """Names of the external data files a graph reads (beside it)."""
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    return {
        entry.value for tensor in proto.graph.initializer for entry in tensor.external_data if entry.key == "location"
    }
