"""The ONNX graphs a bench times: the sparse model, its dense counterpart, and their int8 copies.

resolve MODEL_DIR_OR_ONNX (a .onnx file, an export folder, or a model folder exported here) ->
the dense counterpart (``--dense-baseline``, or a densified copy) -> for ``--precisions int8``,
int8 copies of both, made exactly as ``losa export --int8`` makes them (per-token activations).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path


from ..core.config import BenchConfig
from ..core.errors import ConfigError, ModelError
from ..core.modeling import load_model
from ..export.int8 import quantize_graph
from ..export.onnx_graphs import (
    SIDECAR_FILE,
    GraphSpec,
    ProgressFn,
    densify_graph,
    export_graphs,
    read_graph_spec,
    spec_from_graph,
    verify_export,
)

#: the int8 activation form timed on both engines: the accurate one (export/int8.py, README)
INT8_FORM = "token"


@dataclass
class GraphSet:
    """One model as ONNX graphs, and how they were obtained."""

    role: str
    source: str
    folder: Path
    spec: GraphSpec
    origin: str
    zero_fraction: float = 0.0
    verification: dict | None = None
    precision: str = "fp32"
    form: str | None = None

    def path(self, phase: str) -> Path | None:
        name = self.spec.prefill if phase == "prefill" else self.spec.decode
        return None if name is None else self.folder / name

    def describe(self) -> dict:
        return {"source": self.source, "origin": self.origin, "matmul_zero_fraction": self.zero_fraction,
                "decode_graph": self.spec.decode is not None, "verification": self.verification}


def _from_onnx_file(path: Path, role: str) -> GraphSet:
    spec = read_graph_spec(path.parent)
    if spec is None or spec.prefill != path.name:
        spec = spec_from_graph(path)
        return GraphSet(role, str(path), path.parent, spec, "ONNX file (prefill only: no losa_onnx.json beside it)")
    return GraphSet(role, str(path), path.parent, spec, "ONNX export folder")


def _export_on_the_fly(source: str, scratch: Path, role: str, config: BenchConfig, progress: ProgressFn | None,
                       warnings: list[str]) -> GraphSet:
    """Export a model folder to dynamic-shape graphs in ``scratch`` and verify them (logits, zeros)."""
    loaded = load_model(source, "float32", config.trust_remote_code)
    folder = scratch / role
    spec, export_warnings = export_graphs(loaded.model, folder, None, None, config.opset, True, progress)
    warnings += [f"{role}: {w}" for w in export_warnings]
    verification = verify_export(loaded.model, folder, spec, 1e-3, greedy_steps=2, progress=progress)
    summary = {"prefill_max_abs_diff": verification.prefill_max_abs_diff,
               "decode_max_abs_diff": verification.decode_max_abs_diff, "greedy_match": verification.greedy_match,
               "weights_checked": verification.layers_checked}
    del loaded
    gc.collect()
    return GraphSet(role, source, folder, spec, "model folder, exported to ONNX for this run", verification=summary)


def resolve_graphs(source: str, scratch: Path, role: str, config: BenchConfig, progress: ProgressFn | None,
                   warnings: list[str]) -> GraphSet:
    """Turn MODEL_DIR_OR_ONNX into graphs: .onnx file, export folder, or model folder (exported here)."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".onnx":
        return _from_onnx_file(path, role)
    for folder in (path / "onnx", path):
        if path.is_dir() and (folder / SIDECAR_FILE).is_file():
            return GraphSet(role, source, folder, read_graph_spec(folder), "ONNX export folder")
    try:
        return _export_on_the_fly(source, scratch, role, config, progress, warnings)
    except ModelError as exc:
        raise ModelError(f"{source} is neither an ONNX file, a losa export folder nor a loadable model ({exc})") from None


def densified(sparse: GraphSet, scratch: Path) -> GraphSet:
    """A copy of the sparse graphs with no zeros: the dense timing reference when none is given."""
    folder = scratch / "densified"
    folder.mkdir(parents=True, exist_ok=True)
    for phase in ("prefill", "decode"):
        path = sparse.path(phase)
        if path is not None:
            densify_graph(path, folder / path.name)
    return GraphSet("dense", f"densified copy of {sparse.source}", folder, sparse.spec,
                    "densified copy: the sparse graphs with every zero weight replaced by a small value")


def check_shapes(graphs: GraphSet, config: BenchConfig) -> None:
    """Fixed-shape graphs must match --batch/--seqlen."""
    spec = graphs.spec
    if spec.batch is not None and spec.batch != config.batch:
        raise ConfigError(f"{graphs.source} was exported for batch {spec.batch}; use --batch {spec.batch} or re-export")
    if spec.seqlen is not None and spec.seqlen != config.seqlen:
        raise ConfigError(f"{graphs.source} was exported for {spec.seqlen} tokens; use --seqlen {spec.seqlen} or re-export")




def quantized(fp32: GraphSet, scratch: Path, form: str) -> GraphSet:
    """int8-weight copies of a graph set (prefill and decode) in ``scratch``."""
    folder = scratch / f"{fp32.role}-int8-{form}"
    for phase in ("prefill", "decode"):
        path = fp32.path(phase)
        if path is not None:
            quantize_graph(path, folder / path.name, form)
    return GraphSet(fp32.role, f"{fp32.source} (int8, {form} activations)", folder, fp32.spec,
                    f"int8 weights per output channel, {form} activations, quantized for this run", precision="int8",
                    form=form, zero_fraction=fp32.zero_fraction)


def int8_sets(fp32_sets: list[GraphSet], scratch: Path) -> dict[str, GraphSet]:
    """role -> int8 copy of each graph set, in the per-token form both engines run (see export/int8.py)."""
    return {fp32.role: quantized(fp32, scratch, INT8_FORM) for fp32 in fp32_sets}
