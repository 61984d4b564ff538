"""Export a causal LM to ONNX (prefill and KV-cache decode graphs) and verify the export.

Targets the environment DeepSparse 1.8.0 runs in: onnx < 1.15, torch's TorchScript exporter
(``dynamo=False``) and opset 17.  Two graphs are written:

* ``prefill.onnx``: ``input_ids``, ``attention_mask`` -> ``logits`` (and ``present.{i}.key/value``
  when the decode graph is supported, so generation can start from a prefill);
* ``decode.onnx``: ``input_ids`` (new tokens), ``attention_mask`` (past + new), and
  ``past_key_values.{i}.key/value`` -> ``logits`` and ``present.{i}.key/value``.

Attention is exported in its eager form: DeepSparse 1.8 compiles the SDPA decode graph but
crashes running it, while the eager graph runs on both engines.  Position ids come from the
attention mask, so left padding gives the same positions as in transformers.  Both graphs read
their weights from one shared external file, ``weights.data`` (``onnx_weights.py``).

Verification compares the ONNX Runtime logits with the PyTorch model's on a few inputs, runs
greedy generation through prefill + decode, and checks that every pruned linear weight reached
the ONNX file with the same zeros (found by value, since the exporter renames and transposes).
"""

from __future__ import annotations

import inspect
import json
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .onnx_weights import share_weights
from ..core.errors import ConfigError, ModelError, NumericalError
from ..core.modeling import find_blocks, find_linears

ProgressFn = Callable[[str, int, int], None]

DEFAULT_OPSET = 17
#: the highest opset DeepSparse 1.8.0 compiles (it rejects 19 and 20)
DEEPSPARSE_MAX_OPSET = 17
PREFILL_FILE = "prefill.onnx"
DECODE_FILE = "decode.onnx"
SIDECAR_FILE = "losa_onnx.json"
#: protobuf cannot serialise a message over 2 GiB; stay well under it
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: model_type values whose decode graph was checked end to end (other types are tried and verified)
DECODE_TESTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TRACE_BATCH = 2
TRACE_SEQLEN = 8


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

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ZeroCheck:
    """One pruned linear weight: its zero fraction in the model and in the ONNX file."""

    layer: str
    model_zeros: float
    onnx_zeros: float | None
    initializer: str | None
    transposed: bool


@dataclass
class Verification:
    """Numbers from comparing the ONNX graphs with the PyTorch model."""

    prefill_max_abs_diff: float
    decode_max_abs_diff: float | None
    logits_scale: float
    tolerance: float
    greedy_tokens_torch: list[list[int]] | None
    greedy_tokens_onnx: list[list[int]] | None
    greedy_match: bool | None
    layers_checked: int
    zero_mismatches: list[str]
    zero_checks: list[ZeroCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        limit = self.tolerance * max(1.0, self.logits_scale)
        logits_ok = self.prefill_max_abs_diff <= limit and (self.decode_max_abs_diff or 0.0) <= limit
        return logits_ok and not self.zero_mismatches and self.greedy_match is not False


# ----------------------------------------------------------------------------- environment


def check_onnx_environment(opset: int) -> dict[str, str]:
    """Fail before any work when onnx/onnxruntime are missing or cannot hold ``opset``."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(
            f"--onnx needs onnx and onnxruntime ({exc.name} is missing): pip install 'onnx<1.15' onnxruntime"
        ) from None
    supported = onnx.defs.onnx_opset_version()
    if opset > supported:
        raise ConfigError(
            f"--opset {opset} is above what the installed onnx {onnx.__version__} supports ({supported}); "
            f"use --opset {min(supported, DEFAULT_OPSET)}"
        )
    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "max_opset": str(supported)}


# ----------------------------------------------------------------------------- graph modules


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5 calls the cache argument ``cache``; 4.x called it ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _positions(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Position of each new token = number of real tokens before it (left padding safe)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new_tokens:]


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
        from transformers import DynamicCache

        kwargs = {"position_ids": _positions(attention_mask, input_ids.shape[1])}
        if self.with_cache:
            kwargs[self.cache_keyword] = DynamicCache(config=self.model.config)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=self.with_cache, **kwargs)
        if not self.with_cache:
            return output.logits
        return (output.logits, *_flatten_cache(output))


class DecodeGraph(nn.Module):
    """input_ids (new), attention_mask (past + new), past keys/values -> logits, present keys/values.

    The past arrives as separate tensors (ONNX has no tuples) and is rebuilt into a
    transformers ``DynamicCache`` inside ``forward`` so the model's own code path is traced.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.cache_keyword = _cache_keyword(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                            position_ids=_positions(attention_mask, input_ids.shape[1]), **{self.cache_keyword: cache})
        return (output.logits, *_flatten_cache(output))


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """``{prefix}.{i}.key``, ``{prefix}.{i}.value`` for every layer, in the graphs' order."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def decode_support(model: nn.Module) -> str | None:
    """None when a KV-cache decode graph can be exported, else the reason it cannot.

    Decided from the cache the model really builds: every layer must keep its full past
    (sliding-window or hybrid caches crop it, which a fixed graph cannot express).
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    kinds = {type(layer).__name__ for layer in cache.layers}
    if len(cache.layers) != model.config.num_hidden_layers or kinds != {"DynamicLayer"}:
        return (f"model_type {model.config.model_type!r} uses a {'/'.join(sorted(kinds)) or 'custom'} KV cache "
                f"(sliding window or hybrid); the decode graph supports full-attention caches "
                f"({', '.join(DECODE_TESTED_MODEL_TYPES)} tested)")
    return None


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


def _trace_inputs(batch: int | None, seqlen: int | None, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (batch or TRACE_BATCH, seqlen or TRACE_SEQLEN)
    ids = torch.randint(0, vocab, shape, generator=generator)
    return ids, torch.ones(shape, dtype=torch.long)


def export_graphs(model: nn.Module, folder: Path, batch: int | None = None, seqlen: int | None = None,
                  opset: int = DEFAULT_OPSET, decode: bool = True, progress: ProgressFn | None = None) -> tuple[GraphSpec, list[str]]:
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
            _torch_export(PrefillGraph(model, with_cache), (ids, mask), staged, ["input_ids", "attention_mask"], outputs,
                          {"input_ids": io_dims, "attention_mask": io_dims, "logits": io_dims, **(kv_dims if with_cache else {})},
                          opset)
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
                _torch_export(DecodeGraph(model), (new_ids, full_mask, *past), staged,
                              ["input_ids", "attention_mask", *past_names], ["logits", *present],
                              {"input_ids": batch_dim, "attention_mask": {**batch_dim, 1: "total_sequence"},
                               "logits": batch_dim, **past_dims, **present_dims}, opset)
                staged_graphs[DECODE_FILE] = staged
                if progress:
                    progress("export ONNX graphs", 2, total)
            share_weights(folder, staged_graphs)  # the exporter's per-tensor files go with the scratch folder
    finally:
        if original_attention is not None:
            model.set_attn_implementation(original_attention)
    spec = GraphSpec(prefill=PREFILL_FILE, decode=DECODE_FILE if with_cache else None, num_layers=num_layers,
                     kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, batch=batch, seqlen=seqlen, opset=opset,
                     external_data=True, model_type=str(getattr(config, "model_type", "?")))
    (folder / SIDECAR_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    return spec, warnings_out


def read_graph_spec(folder: Path) -> GraphSpec | None:
    """The sidecar written by ``export_graphs``, or None for a folder without one."""
    path = folder / SIDECAR_FILE
    if not path.is_file():
        return None
    try:
        return GraphSpec(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise ModelError(f"{path} is not a valid losa ONNX description ({exc}); re-run losa export --onnx") from None


# ----------------------------------------------------------------------------- verification


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
        feed = {"input_ids": tokens[-1][:, None].astype(np.int64), "attention_mask": mask, **dict(zip(past_names, past))}
        outputs = decode.run(None, feed)
        logits, past = outputs[0], outputs[1:]
        tokens.append(logits[:, -1].argmax(-1))
    return np.stack(tokens, axis=1)


def _verify_shapes(spec: GraphSpec) -> list[tuple[int, int]]:
    """A few (batch, seqlen) pairs inside what the graph allows; two shapes when dims are dynamic."""
    first = (spec.batch or 1, spec.seqlen or 12)
    second = (spec.batch or 2, spec.seqlen or 5)
    return [first] if first == second else [first, second]


@torch.no_grad()
def verify_logits(model: nn.Module, folder: Path, spec: GraphSpec, greedy_steps: int = 4,
                  seed: int = 1) -> tuple[float, float | None, float, list[list[int]] | None, list[list[int]] | None]:
    """Max |ONNX - PyTorch| of prefill logits and of one decode step, plus greedy tokens of both.

    The reference is the model as loaded (its own attention implementation), so the check
    covers the eager rewrite too.
    """
    generator = torch.Generator().manual_seed(seed)
    prefill = ort_session(folder / spec.prefill)
    decode = ort_session(folder / spec.decode) if spec.decode else None
    prefill_diff, scale, decode_diff = 0.0, 0.0, None
    for batch, seqlen in _verify_shapes(spec):
        ids = torch.randint(0, spec.vocab_size, (batch, seqlen), generator=generator)
        mask = torch.ones_like(ids)
        reference = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().numpy()
        outputs = prefill.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        prefill_diff = max(prefill_diff, float(np.abs(outputs[0] - reference).max()))
        scale = max(scale, float(np.abs(reference).max()))
        if decode is None:
            continue
        new = torch.randint(0, spec.vocab_size, (batch, 1), generator=generator)
        longer = torch.cat([ids, new], dim=1)
        full = model(input_ids=longer, attention_mask=torch.ones_like(longer), use_cache=False).logits[:, -1:].float().numpy()
        feed = {"input_ids": new.numpy(), "attention_mask": np.ones(longer.shape, dtype=np.int64),
                **dict(zip(kv_names(spec.num_layers, "past_key_values"), outputs[1:]))}
        step = decode.run(None, feed)[0]
        decode_diff = max(decode_diff or 0.0, float(np.abs(step - full).max()))
    torch_tokens = onnx_tokens = None
    if decode is not None and greedy_steps > 0:
        ids = torch.randint(0, spec.vocab_size, (spec.batch or 1, spec.seqlen or 6), generator=generator)
        torch_tokens = greedy_torch(model, ids, greedy_steps).tolist()
        onnx_tokens = onnx_greedy(prefill, decode, ids.numpy(), greedy_steps, spec.num_layers).tolist()
    return prefill_diff, decode_diff, scale, torch_tokens, onnx_tokens


@torch.no_grad()
def greedy_torch(model: nn.Module, input_ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy generation in PyTorch by full forward passes (no cache: an independent reference)."""
    ids = input_ids
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, input_ids.shape[1]:]


def onnx_matmul_weights(path: Path) -> dict[str, np.ndarray]:
    """2-D float initializers that feed a MatMul or Gemm: the linear weights as the engines see them."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=True)
    consumers = {name for node in proto.graph.node if node.op_type in ("MatMul", "Gemm") for name in node.input}
    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer
            if init.name in consumers and len(init.dims) == 2 and init.data_type in (1, 10, 16)}


def _fingerprint(array: np.ndarray) -> tuple:
    """Exact, transpose-invariant key: sorted shape, zero count, largest and smallest value."""
    return (tuple(sorted(array.shape)), int(np.count_nonzero(array == 0)), float(array.max()), float(array.min()))


def pruned_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every block linear layer (``index.name``), plus the output head when it holds zeros (``--prune-lm-head``)."""
    layers = {f"{index}.{name}": linear for index, block in enumerate(find_blocks(model))
              for name, linear in find_linears(block).items()}
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and bool((head.weight == 0).any()):
        layers["lm_head"] = head
    return layers


def check_zeros(model: nn.Module, weights: dict[str, np.ndarray]) -> list[ZeroCheck]:
    """Find each block linear weight among the ONNX initializers (same values, maybe transposed).

    Matching is by value, not name: the exporter renames folded weights and stores MatMul
    weights transposed; identical initializers may be shared (deduplicated).
    """
    buckets: dict[tuple, list[str]] = {}
    for name, array in weights.items():
        buckets.setdefault(_fingerprint(array), []).append(name)
    checks = []
    for layer, linear in pruned_linears(model).items():
        weight = linear.weight.detach().float().numpy()
        model_zeros = float(np.count_nonzero(weight == 0)) / weight.size
        found = None
        for candidate in buckets.get(_fingerprint(weight), []):
            array = weights[candidate]
            if array.shape == weight.shape and np.array_equal(array, weight):
                found = (candidate, False)
            elif array.shape == weight.T.shape and np.array_equal(array, weight.T):
                found = (candidate, True)
            if found:
                break
        if found is None:
            checks.append(ZeroCheck(layer, model_zeros, None, None, False))
            continue
        array = weights[found[0]]
        checks.append(ZeroCheck(layer, model_zeros, float(np.count_nonzero(array == 0)) / array.size, found[0], found[1]))
    return checks


def verify_export(model: nn.Module, folder: Path, spec: GraphSpec, tolerance: float, greedy_steps: int = 4,
                  progress: ProgressFn | None = None) -> Verification:
    """Logits, greedy tokens and zeros of the exported graphs against the model; raises on failure."""
    if progress:
        progress("verify ONNX", 0, 2)
    prefill_diff, decode_diff, scale, torch_tokens, onnx_tokens = verify_logits(model, folder, spec, greedy_steps)
    if progress:
        progress("verify ONNX", 1, 2)
    zero_checks: list[ZeroCheck] = []
    mismatches: list[str] = []
    for graph in filter(None, (spec.prefill, spec.decode)):
        checks = check_zeros(model, onnx_matmul_weights(folder / graph))
        for check in checks:
            if check.onnx_zeros is None:
                mismatches.append(f"{graph}: {check.layer} not found among the MatMul/Gemm weights")
            elif check.onnx_zeros != check.model_zeros:
                mismatches.append(f"{graph}: {check.layer} zeros {check.onnx_zeros:.6f} != model {check.model_zeros:.6f}")
        zero_checks = zero_checks or checks
    if progress:
        progress("verify ONNX", 2, 2)
    result = Verification(prefill_diff, decode_diff, scale, tolerance, torch_tokens, onnx_tokens,
                          None if torch_tokens is None else torch_tokens == onnx_tokens, len(zero_checks), mismatches,
                          zero_checks)
    if not result.passed:
        raise NumericalError(_failure_message(result))
    return result


def _failure_message(result: Verification) -> str:
    limit = result.tolerance * max(1.0, result.logits_scale)
    parts = []
    if result.prefill_max_abs_diff > limit or (result.decode_max_abs_diff or 0.0) > limit:
        parts.append(f"ONNX logits differ from PyTorch by {max(result.prefill_max_abs_diff, result.decode_max_abs_diff or 0):.3g} "
                     f"(limit {limit:.3g}); this architecture does not trace faithfully with the TorchScript exporter")
    if result.greedy_match is False:
        parts.append(f"greedy tokens differ (torch {result.greedy_tokens_torch}, onnx {result.greedy_tokens_onnx})")
    if result.zero_mismatches:
        parts.append(f"{len(result.zero_mismatches)} weights lost their zeros, first: {result.zero_mismatches[0]}")
    return "ONNX verification failed: " + "; ".join(parts) + "; nothing was written"


# ----------------------------------------------------------------------------- ONNX-level helpers for bench


def weight_sparsity(paths: Sequence[Path]) -> float:
    """Zero fraction over the MatMul/Gemm weights of the first graph (all graphs share weights)."""
    weights = onnx_matmul_weights(paths[0])
    total = sum(a.size for a in weights.values())
    zeros = sum(int(np.count_nonzero(a == 0)) for a in weights.values())
    return zeros / total if total else 0.0


def densify_graph(source: Path, target: Path, seed: int = 0) -> int:
    """Copy an ONNX graph with every zero of its MatMul/Gemm weights replaced by a small value.

    The dense counterpart for a timing comparison when no original model is given: same graph,
    same shapes, no zeros.  Its outputs are meaningless; only its speed is used.  Returns the
    number of zeros filled.
    """
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    proto = onnx.load(str(source), load_external_data=True)
    consumers = {name for node in proto.graph.node if node.op_type in ("MatMul", "Gemm") for name in node.input}
    filled = 0
    for init in proto.graph.initializer:
        if init.name not in consumers or len(init.dims) != 2 or init.data_type != 1:
            continue
        array = numpy_helper.to_array(init).copy()
        zeros = array == 0
        count = int(zeros.sum())
        if count == 0:
            continue
        scale = float(np.abs(array[~zeros]).mean()) if count < array.size else 0.02
        array[zeros] = (rng.standard_normal(count) * scale * 0.01 + scale * 0.001).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(array, init.name))
        filled += count
    size = sum(init.ByteSize() for init in proto.graph.initializer)
    if size >= EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=target.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(target))
    return filled


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
        raise ModelError(f"{path} has no input_ids input; losa bench runs causal LM graphs (export with losa export --onnx)")
    if any(n.startswith("past_key_values") for n in names):
        raise ModelError(f"{path} is a decode graph; give the prefill graph or the export folder holding both")
    dims = proto.graph.input[names.index("input_ids")].type.tensor_type.shape.dim
    fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    logits = next((o for o in proto.graph.output if o.name == "logits"), proto.graph.output[0])
    vocab_dim = logits.type.tensor_type.shape.dim[-1]
    vocab = vocab_dim.dim_value if vocab_dim.HasField("dim_value") else 32000
    return GraphSpec(prefill=path.name, decode=None, num_layers=0, kv_heads=None, head_dim=None, vocab_size=int(vocab),
                     batch=fixed[0] if fixed else None, seqlen=fixed[1] if len(fixed) > 1 else None,
                     opset=max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0),
                     external_data=any(i.data_location == 1 for i in proto.graph.initializer), model_type="?")
