"""Export a causal LM to ONNX: the prefill and KV-cache decode graphs (their layout: ``runtime/onnx_io.py``).

Targets the environment DeepSparse 1.8.0 runs in: torch's TorchScript exporter (``dynamo=False``)
and opset 17.  Attention is exported in its eager form: DeepSparse 1.8 compiles the SDPA decode
graph but crashes running it, while the eager graph runs on both engines.  Position ids come from
the attention mask, so left padding gives the same positions as in transformers.  Sliding-window
layers (Gemma 3, Mistral with ``sliding_window``) get their whole past too (``_full_cache``).  Both graphs read
their weights from one shared external file, ``weights.data`` (``onnx_weights.py``).  What was
written is verified through ONNX Runtime in ``verify.py``.
"""

from __future__ import annotations

import inspect
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ModelError
from ..core.sequential import ProgressFn
from ..runtime import DECODE_FILE, DEFAULT_OPSET, PREFILL_FILE, GraphSpec, kv_names, write_graph_spec
from .onnx_weights import share_weights

#: protobuf cannot serialise a message over 2 GiB; stay well under it
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: model_type values whose decode graph was checked end to end (other types are tried and verified)
#: (mistral and gemma3_text with their sliding windows: decode verified past the window)
DECODE_TESTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
TRACE_BATCH = 2
TRACE_SEQLEN = 8


# ----------------------------------------------------------------------------- graph modules


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5 calls the cache argument ``cache``; 4.x called it ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _positions(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Position of each new token = number of real tokens before it (left padding safe)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new_tokens:]


def _full_cache(pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """A transformers ``DynamicCache`` whose every layer keeps its whole past, sliding-window layers included.

    Why not the model's own cache: for sliding-window layers it builds ``DynamicSlidingWindowLayer``s,
    which crop the past to the last ``sliding_window - 1`` tokens with Python branches on the past
    length; a traced graph would freeze the branch taken at trace time.  With the whole past, the
    model's own sliding-window mask (``create_sliding_window_causal_mask``: key ``k`` is seen from
    query ``q`` when ``q - window < k <= q``, counted from the start of the sequence) hides exactly the
    keys the cropped cache would have dropped, so the logits equal transformers' with its hybrid cache.
    Every layer's past then has the same length, and the feeders need nothing new; the cost is that a
    sliding layer's past grows with the sequence instead of stopping at the window.
    """
    from transformers import DynamicCache

    return DynamicCache() if pairs is None else DynamicCache(ddp_cache_data=pairs)


def _flatten_cache(output) -> list[torch.Tensor]:
    cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
    flat: list[torch.Tensor] = []
    for layer in cache.layers:
        flat += [layer.keys, layer.values]
    return flat


class PrefillGraph(nn.Module):
    """input_ids, attention_mask -> logits (+ the KV cache when ``with_cache``)."""

    def __init__(self, model: nn.Module, with_cache: bool):
        super().__init__()
        self.model = model
        self.with_cache = with_cache
        self.cache_keyword = _cache_keyword(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        kwargs = {"position_ids": _positions(attention_mask, input_ids.shape[1])}
        if self.with_cache:
            kwargs[self.cache_keyword] = _full_cache()
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=self.with_cache, **kwargs)
        if not self.with_cache:
            return output.logits
        return (output.logits, *_flatten_cache(output))


class DecodeGraph(nn.Module):
    """input_ids (new), attention_mask (past + new), past keys/values -> logits, present keys/values.

    The past arrives as separate tensors (ONNX has no tuples) and is rebuilt into a
    transformers ``DynamicCache`` inside ``forward`` so the model's own code path is traced;
    every layer's past holds every past token (``_full_cache`` says why).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.cache_keyword = _cache_keyword(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = _full_cache(pairs)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                            position_ids=_positions(attention_mask, input_ids.shape[1]), **{self.cache_keyword: cache})
        return (output.logits, *_flatten_cache(output))


#: kinds of layer in transformers' own cache that the decode graph reproduces (``_full_cache`` says how)
DECODE_CACHE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


def _model_cache_layers(model: nn.Module) -> list:
    """The layers of the cache transformers itself builds for this model (generate's default)."""
    from transformers import DynamicCache

    return list(DynamicCache(config=model.config).layers)


def decode_support(model: nn.Module) -> str | None:
    """None when a KV-cache decode graph can be exported, else the reason it cannot.

    Decided from the cache the model really builds: every layer must attend over its past, all of
    it or a sliding window of it.  Chunked attention (Llama 4) uses the same cache layer as a sliding
    window but its own chunk mask, which is not verified here; linear-attention, convolution and
    shared-KV layers keep no per-token past.  Both are refused.
    """
    layers = _model_cache_layers(model)
    kinds = {type(layer).__name__ for layer in layers}
    chunked = getattr(model.config, "attention_chunk_size", None) is not None
    if len(layers) != model.config.num_hidden_layers or not kinds <= set(DECODE_CACHE_LAYERS) or chunked:
        what = "chunked-attention" if chunked else "/".join(sorted(kinds)) or "custom"
        return (f"model_type {model.config.model_type!r} uses a {what} KV cache; the decode graph supports "
                f"full-attention and sliding-window caches ({', '.join(DECODE_TESTED_MODEL_TYPES)} tested)")
    return None


def sliding_window(model: nn.Module) -> int | None:
    """How many positions the model's sliding-window layers attend to (query included); None when no layer slides."""
    windows = [int(layer.sliding_window) for layer in _model_cache_layers(model) if getattr(layer, "is_sliding", False)]
    return max(windows) if windows else None


# ----------------------------------------------------------------------------- export


def _unsupported_op(exc: BaseException) -> str:
    """Name the operator a failed export tripped on, for a one-line error."""
    text = str(exc)
    match = re.search(r"(aten|prim|onnx)::[A-Za-z_0-9.]+", text)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"operator {match.group(0)}" if match else first[:300]


def _torch_export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                  dynamic_axes: dict, opset: int) -> None:
    """Run the TorchScript exporter, turning its failures into a ModelError naming the op."""
    try:
        with torch.no_grad():  # its TracerWarnings (expected: Python control flow) follow core/quiet.py
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    except Exception as exc:  # the exporter raises many unrelated types
        raise ModelError(f"the ONNX exporter (opset {opset}) cannot trace this model: {_unsupported_op(exc)}; "
                         "try another --opset or report the architecture") from None


def _trace_inputs(batch: int | None, seqlen: int | None, vocab: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch or TRACE_BATCH, seqlen or TRACE_SEQLEN)
    ids = torch.randint(0, vocab, shape, generator=generator)
    return ids, torch.ones(shape, dtype=torch.long)


def export_graphs(
    model: nn.Module,
    folder: Path,
    batch: int | None = None,
    seqlen: int | None = None,
    opset: int = DEFAULT_OPSET,
    decode: bool = True,
    progress: ProgressFn | None = None,
) -> tuple[GraphSpec, list[str]]:
    """Export the prefill (and decode) graphs into ``folder``; returns their spec and warnings.

    ``batch``/``seqlen`` fix those dims; None leaves them dynamic.  The model is traced in eager
    attention and restored afterwards.
    """
    warnings_out: list[str] = []
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    vocab = int(config.vocab_size)
    reason = decode_support(model) if decode else "not requested"
    if decode and reason is not None:
        warnings_out.append(f"no decode graph: {reason}")
    with_cache = reason is None
    original_attention = getattr(config, "_attn_implementation", None)
    model.set_attn_implementation("eager")
    try:
        ids, mask = _trace_inputs(batch, seqlen, vocab)
        num_layers = int(config.num_hidden_layers)
        present = kv_names(num_layers, "present")
        batch_dim = {} if batch else {0: "batch"}
        seq_dim = {} if seqlen else {1: "sequence"}
        io_dims = {**batch_dim, **seq_dim}
        total = 2 if with_cache else 1
        if progress:
            progress("export ONNX graphs", 0, total)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            staged = Path(scratch) / "prefill" / PREFILL_FILE
            staged.parent.mkdir()
            outputs = ["logits", *(present if with_cache else [])]
            kv_dims = {name: {**batch_dim, **({} if seqlen else {2: "sequence"})} for name in present}
            _torch_export(
                PrefillGraph(model, with_cache),
                (ids, mask),
                staged,
                ["input_ids", "attention_mask"],
                outputs,
                {"input_ids": io_dims, "attention_mask": io_dims, "logits": io_dims, **(kv_dims if with_cache else {})},
                opset,
            )
            staged_graphs = {PREFILL_FILE: staged}
            if progress:
                progress("export ONNX graphs", 1, total)
            kv_heads = head_dim = None
            if with_cache:
                with torch.no_grad():
                    past = PrefillGraph(model, True)(ids, mask)[1:]
                kv_heads, head_dim = int(past[0].shape[1]), int(past[0].shape[3])
                new_ids = ids[:, :1]
                full_mask = torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long)
                past_names = kv_names(num_layers, "past_key_values")
                past_dims = {name: {**batch_dim, 2: "past_sequence"} for name in past_names}
                present_dims = {name: {**batch_dim, 2: "total_sequence"} for name in present}
                staged = Path(scratch) / "decode" / DECODE_FILE
                staged.parent.mkdir()
                _torch_export(
                    DecodeGraph(model),
                    (new_ids, full_mask, *past),
                    staged,
                    ["input_ids", "attention_mask", *past_names],
                    ["logits", *present],
                    {
                        "input_ids": batch_dim,
                        "attention_mask": {**batch_dim, 1: "total_sequence"},
                        "logits": batch_dim,
                        **past_dims,
                        **present_dims,
                    },
                    opset,
                )
                staged_graphs[DECODE_FILE] = staged
                if progress:
                    progress("export ONNX graphs", 2, total)
            share_weights(folder, staged_graphs)  # the exporter's per-tensor files go with the scratch folder
    finally:
        if original_attention is not None:
            model.set_attn_implementation(original_attention)
    spec = GraphSpec(
        prefill=PREFILL_FILE,
        decode=DECODE_FILE if with_cache else None,
        num_layers=num_layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        batch=batch,
        seqlen=seqlen,
        opset=opset,
        external_data=True,
        model_type=str(getattr(config, "model_type", "?")),
        sliding_window=sliding_window(model),
    )
    write_graph_spec(folder, spec)
    return spec, warnings_out
