"""int8 ONNX graphs from fp32 ones: every constant-weight MatMul gets int8 weights.

Weights are quantized per output channel (a MatMul ``B`` is ``[K, N]``: one scale per column),
symmetrically, so a zero weight is the integer 0 and every pruned weight stays exactly zero;
kept weights smaller than half a step also become 0, and that count is reported.  Three
activation forms, compared in benchmarks/cpu_int8.py:

* ``token`` (what ``losa export --int8`` and ``losa bench`` use): one symmetric scale per token,
  ``max|x| / 127``, computed in the graph; ``MatMulInteger`` then rescales per token and per
  channel.  No calibration, and a decode step quantizes exactly as a prefill does.  Both
  engines run it; it costs SmolLM2 3% perplexity.
* ``dynamic``: ONNX Runtime's form, ``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul``,
  one scale per tensor computed per call (67% perplexity on SmolLM2; DeepSparse crashes on it).
* ``static``: SparseML's form for DeepSparse, ``QuantizeLinear`` with a calibrated per-tensor
  scale (``activation_ranges``), then ``MatMulInteger -> Cast -> Mul`` (80% perplexity).

ONNX Runtime's own quantization tool needs onnx >= 1.16 (int4 types), which the DeepSparse pin
(onnx < 1.15) excludes, so the rewrite is done here with plain onnx helpers.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ACTIVATION_FORMS = ("token", "dynamic", "static")
#: uint8 zero point of the per-token form's symmetric activations (and of every stored weight)
MIDPOINT = 128
INT8_MAX = 127


@dataclass
class QuantizedLayer:
    """One quantized weight: how many zeros it had, and how many rounding added."""

    initializer: str
    shape: list[int]
    zeros_fp32: int
    zeros_int8: int
    pruned_zeros_kept: bool


@dataclass
class QuantizeReport:
    """What ``quantize_graph`` did to one graph."""

    source: str
    target: str
    activations: str
    matmuls_quantized: int
    weights_quantized: int
    weight_bytes_fp32: int
    weight_bytes_int8: int
    layers: list[QuantizedLayer] = field(default_factory=list)

    @property
    def zeros_kept(self) -> bool:
        return all(layer.pruned_zeros_kept for layer in self.layers)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["zeros_kept"] = self.zeros_kept
        data["rounding_zeros"] = sum(layer.zeros_int8 - layer.zeros_fp32 for layer in self.layers)
        return data


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per column of a ``[K, N]`` MatMul weight: ``weight ~= q * scale[None, :]``.

    Zero maps to 0 exactly (no zero point), so the sparsity pattern survives; an all-zero
    column gets scale 1 so nothing divides by zero.
    """
    absmax = np.abs(weight).max(axis=0)
    scale = np.where(absmax > 0, absmax / INT8_MAX, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(weight / scale[None, :]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return quantized, scale


def weight_key(array: np.ndarray) -> str:
    """Identity of a weight across separately exported graphs (prefill and decode rename tensors)."""
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest() + str(array.shape)


def _constant_matmuls(proto) -> list[int]:
    """Indices of the MatMul nodes whose second input is a 2-D float initializer (the linear layers)."""
    floats = {init.name for init in proto.graph.initializer if init.data_type == 1 and len(init.dims) == 2}
    return [
        index for index, node in enumerate(proto.graph.node) if node.op_type == "MatMul" and node.input[1] in floats
    ]


def activation_ranges(prefill_path: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, tuple[float, float]]:
    """Min and max of every constant-weight MatMul's input over ``feeds``, keyed by ``weight_key``.

    The fp32 prefill graph is run with those inputs exposed as extra outputs; keys are weight
    hashes so the ranges apply to the decode graph too, whose tensor names differ.
    """
    import onnx
    from onnx import numpy_helper

    from ..runtime import ort_session

    proto = onnx.load(str(prefill_path), load_external_data=True)
    arrays = {init.name: init for init in proto.graph.initializer}
    tensor_to_keys: dict[str, list[str]] = {}
    for index in _constant_matmuls(proto):
        node = proto.graph.node[index]
        tensor_to_keys.setdefault(node.input[0], []).append(weight_key(numpy_helper.to_array(arrays[node.input[1]])))
    existing = {out.name for out in proto.graph.output}
    for name in tensor_to_keys:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory(prefix="losa-calib-") as scratch:
        path = Path(scratch) / "calib.onnx"
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="calib.onnx.data",
            size_threshold=1024,
        )
        session = ort_session(path)
        names = [out.name for out in session.get_outputs()]
        ranges: dict[str, tuple[float, float]] = {}
        for feed in feeds:
            for name, value in zip(names, session.run(None, feed)):
                if name not in tensor_to_keys:
                    continue
                low, high = float(value.min()), float(value.max())
                for key in tensor_to_keys[name]:
                    old = ranges.get(key, (low, high))
                    ranges[key] = (min(old[0], low), max(old[1], high))
    return ranges


def _uint8_params(low: float, high: float) -> tuple[float, int]:
    """Asymmetric uint8 scale and zero point covering [low, high] (and 0, so zero is exact)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0 if high > low else 1.0
    zero_point = int(np.clip(np.rint(-low / scale), 0, 255))
    return scale, zero_point


def _per_token_quantize(x: str, tag: str, nodes: list, inits: list) -> tuple[str, str, str]:
    """Nodes quantizing activation ``x`` per token (last axis), symmetrically, to uint8 around 128.

    ``scale = max|x| / 127`` per token, ``q = round(x / scale) + 128``; the zero point is a
    scalar, which MatMulInteger requires, and the per-token scale multiplies the int32 result.
    Returns the names of (q, per-token scale, zero point).
    """
    from onnx import TensorProto, helper, numpy_helper

    inits += [
        numpy_helper.from_array(np.array(INT8_MAX, np.float32), f"{tag}_127"),
        numpy_helper.from_array(np.array(1e-12, np.float32), f"{tag}_eps"),
        numpy_helper.from_array(np.array(MIDPOINT, np.float32), f"{tag}_mid"),
        numpy_helper.from_array(np.array(MIDPOINT, np.uint8), f"{tag}_zp"),
    ]
    nodes += [
        helper.make_node("Abs", [x], [f"{tag}_abs"]),
        helper.make_node("ReduceMax", [f"{tag}_abs"], [f"{tag}_max"], axes=[-1], keepdims=1),
        helper.make_node("Div", [f"{tag}_max", f"{tag}_127"], [f"{tag}_raw_scale"]),
        helper.make_node("Max", [f"{tag}_raw_scale", f"{tag}_eps"], [f"{tag}_scale"]),
        helper.make_node("Div", [x, f"{tag}_scale"], [f"{tag}_scaled"]),
        helper.make_node("Round", [f"{tag}_scaled"], [f"{tag}_rounded"]),
        helper.make_node("Add", [f"{tag}_rounded", f"{tag}_mid"], [f"{tag}_shifted"]),
        helper.make_node("Cast", [f"{tag}_shifted"], [f"{tag}_q"], to=TensorProto.UINT8),
    ]
    return f"{tag}_q", f"{tag}_scale", f"{tag}_zp"


def quantize_graph(
    source: Path, target: Path, activations: str = "dynamic", ranges: dict[str, tuple[float, float]] | None = None
) -> QuantizeReport:
    """Write ``target``: ``source`` with int8 weights in every constant-weight MatMul.

    ``static`` needs ``ranges`` from ``activation_ranges``; a MatMul whose weight has no range
    (not reached by the calibration graph) stays fp32 and is not counted.

    The symmetric integers are stored shifted to uint8 with zero point 128 (SparseML's
    convention for DeepSparse), so a pruned weight is the value 128, still exactly zero.  Why
    not int8: on x86 CPUs without VNNI, ONNX Runtime's uint8 x int8 kernel adds pairs of
    products in saturating int16 and overflows (logit errors of 40% on a tiny model, against
    2% with uint8 x uint8).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .onnx_graphs import EXTERNAL_DATA_THRESHOLD

    if activations not in ACTIVATION_FORMS:
        raise ValueError(f"activations must be one of {ACTIVATION_FORMS}, got {activations!r}")
    if activations == "static" and not ranges:
        raise ValueError("static activations need calibrated ranges")
    proto = onnx.load(str(source), load_external_data=True)
    initializers = {init.name: init for init in proto.graph.initializer}
    report = QuantizeReport(str(source), str(target), activations, 0, 0, 0, 0)
    done: dict[str, tuple[str, str, str, np.ndarray]] = {}  # weight initializer -> (q, zero point, scale) names, scale
    new_nodes, new_inits = [], []
    per_token: dict[str, tuple[str, str, str]] = {}  # activation -> its quantized form, shared by q/k/v and gate/up
    matmuls = set(_constant_matmuls(proto))
    for index, node in enumerate(proto.graph.node):
        if index not in matmuls:
            new_nodes.append(node)
            continue
        x, weight_name = node.input
        weight = numpy_helper.to_array(initializers[weight_name]).astype(np.float32)
        key = weight_key(weight)
        if activations == "static" and key not in ranges:
            new_nodes.append(node)
            continue
        if weight_name not in done:
            quantized, scale = quantize_weight(weight)
            stored = (quantized.astype(np.int16) + 128).astype(np.uint8)
            zero_point = np.full(scale.shape, 128, np.uint8)
            names = (f"{weight_name}_int8", f"{weight_name}_int8_zp", f"{weight_name}_int8_scale")
            new_inits += [
                numpy_helper.from_array(stored, names[0]),
                numpy_helper.from_array(zero_point, names[1]),
                numpy_helper.from_array(scale, names[2]),
            ]
            done[weight_name] = (*names, scale)
            zeros_fp32, zeros_int8 = int(np.count_nonzero(weight == 0)), int(np.count_nonzero(quantized == 0))
            report.layers.append(
                QuantizedLayer(
                    weight_name, list(weight.shape), zeros_fp32, zeros_int8, bool(np.all(quantized[weight == 0] == 0))
                )
            )
            report.weights_quantized += 1
            report.weight_bytes_fp32 += weight.nbytes
            report.weight_bytes_int8 += quantized.nbytes + scale.nbytes
        q_name, zp_name, scale_name, scale = done[weight_name]
        out, tag = node.output[0], node.name or f"matmul{report.matmuls_quantized}"
        # each form gives the quantized activation, its zero point, and the scales that turn int32 back into floats
        if activations == "token":
            if x not in per_token:
                per_token[x] = _per_token_quantize(x, f"{tag}_x", new_nodes, new_inits)
            xq, xs, xzp = per_token[x]
            rescale = [xs, scale_name]  # per token, then per channel
        elif activations == "dynamic":
            xq, xzp, rescale = f"{tag}_xq", f"{tag}_xzp", [f"{tag}_scale"]
            new_nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [xq, f"{tag}_xs", xzp]))
            new_nodes.append(helper.make_node("Mul", [f"{tag}_xs", scale_name], [f"{tag}_scale"]))
        else:
            xq, xzp, rescale = f"{tag}_xq", f"{tag}_xzp", [f"{tag}_scale"]
            x_scale, x_zero = _uint8_params(*ranges[key])
            new_inits += [
                numpy_helper.from_array(np.array(x_scale, np.float32), f"{tag}_xs"),
                numpy_helper.from_array(np.array(x_zero, np.uint8), xzp),
                numpy_helper.from_array((x_scale * scale).astype(np.float32), f"{tag}_scale"),
            ]
            new_nodes.append(helper.make_node("QuantizeLinear", [x, f"{tag}_xs", xzp], [xq]))
        new_nodes.append(helper.make_node("MatMulInteger", [xq, q_name, xzp, zp_name], [f"{tag}_i32"]))
        new_nodes.append(helper.make_node("Cast", [f"{tag}_i32"], [f"{tag}_f32"], to=TensorProto.FLOAT))
        current = f"{tag}_f32"
        for position, factor in enumerate(rescale):
            product = out if position == len(rescale) - 1 else f"{tag}_rows"
            new_nodes.append(helper.make_node("Mul", [current, factor], [product]))
            current = product
        report.matmuls_quantized += 1
    used = {name for node in new_nodes for name in node.input}
    kept = [init for init in proto.graph.initializer if init.name in used]
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept + [init for init in new_inits if init.name in used])
    target.parent.mkdir(parents=True, exist_ok=True)
    if sum(init.ByteSize() for init in proto.graph.initializer) >= EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            proto,
            str(target),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=target.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(proto, str(target))
    return report


#: the text the int8 graphs are compared on: random token ids make outlier activations that real
#: text does not, so agreement on them says little about the model a user runs
COMPARISON_TEXT = (
    "The city council met on Tuesday to discuss the new budget for public schools. After a long debate, "
    "the members agreed to raise teachers' salaries and to repair the roofs of three old buildings."
)


def export_int8(
    fp32_folder: Path, int8_folder: Path, prompt_ids: np.ndarray | None = None, greedy_steps: int = 8, seed: int = 0
) -> dict:
    """Quantize an export's graphs (per-token activations) into ``int8_folder`` and compare them with fp32.

    Returns the reports of both graphs plus the comparison on ``prompt_ids`` (a batch of token
    ids; random ids when None): max |logits difference| of the prefill graph next to the largest
    fp32 logit, the top-1 agreement over its positions, and the share of greedy tokens (prefill +
    decode) equal to the fp32 graphs'.  Raises when a pruned weight is lost.
    """
    from ..core.errors import NumericalError
    from ..runtime import GraphSpec, onnx_greedy, ort_session, read_graph_spec, write_graph_spec
    from .onnx_weights import share_weights

    spec = read_graph_spec(fp32_folder)
    int8_folder.mkdir(parents=True, exist_ok=True)
    reports = {}
    for graph in filter(None, (spec.prefill, spec.decode)):
        report = quantize_graph(fp32_folder / graph, int8_folder / graph, "token")
        if not report.zeros_kept:
            raise NumericalError(f"int8 {graph}: a pruned weight became non-zero; nothing was written")
        reports[graph] = {k: v for k, v in report.to_dict().items() if k != "layers"}
    shared = share_weights(int8_folder, {graph: int8_folder / graph for graph in reports})
    write_graph_spec(int8_folder, GraphSpec(**{**spec.to_dict(), "precision": "int8"}))
    ids = prompt_ids
    if ids is None:
        ids = np.random.default_rng(seed).integers(
            0, spec.vocab_size, (spec.batch or 2, spec.seqlen or 16), dtype=np.int64
        )
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    fp32_prefill, int8_prefill = ort_session(fp32_folder / spec.prefill), ort_session(int8_folder / spec.prefill)
    reference, quantized = fp32_prefill.run(["logits"], feed)[0], int8_prefill.run(["logits"], feed)[0]
    comparison = {
        "prefill_max_abs_diff": float(np.abs(reference - quantized).max()),
        "logits_max_abs": float(np.abs(reference).max()),
        "top1_agreement": float((reference.argmax(-1) == quantized.argmax(-1)).mean()),
    }
    if spec.decode and greedy_steps > 0:
        tokens = [
            onnx_greedy(prefill, ort_session(folder / spec.decode), ids, greedy_steps, spec.num_layers)
            for prefill, folder in ((fp32_prefill, fp32_folder), (int8_prefill, int8_folder))
        ]
        comparison["greedy_agreement"] = float((tokens[0] == tokens[1]).mean())
        comparison["greedy_steps"] = greedy_steps
    comparison["inputs"] = "random token ids" if prompt_ids is None else f"COMPARISON_TEXT ({ids.shape[1]} tokens)"
    return {
        "graphs": reports,
        "shared_weights": shared,
        "comparison": comparison,
        "activations": "per token, symmetric (computed in the graph)",
        "weights": "per output channel, symmetric, stored as uint8 with zero point 128",
    }
