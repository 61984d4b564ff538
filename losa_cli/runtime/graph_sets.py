"""The ONNX graphs a bench times, as ``runtime`` reads them: one model's graph set, and the sets of a run.

A graph set is a model's prefill (and decode) graph with its ``GraphSpec``: read from a ``.onnx``
file or an export folder here; made by ``export/bench_inputs.py`` when the bench's callers have to
export a model folder, densify a copy or quantize to int8 first (runtime never writes graphs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ConfigError
from .config import BenchConfig
from .onnx_io import SIDECAR_FILE, GraphSpec, read_graph_spec, spec_from_graph


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


@dataclass
class BenchGraphs:
    """What the ONNX engines of one bench time: the sparse and dense sets, their int8 copies by role
    (``sparse``/``dense``; empty without ``--precisions int8``), and the warnings of making them."""

    sparse: GraphSet
    dense: GraphSet
    int8: dict[str, GraphSet] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def read_graph_set(source: str, role: str) -> GraphSet | None:
    """``source`` as graphs when it already is some (a .onnx file, or an export folder or its ``onnx/``),
    else None (a model folder, to be exported by the caller)."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".onnx":
        spec = read_graph_spec(path.parent)
        if spec is None or spec.prefill != path.name:
            return GraphSet(role, str(path), path.parent, spec_from_graph(path),
                            "ONNX file (prefill only: no losa_onnx.json beside it)")
        return GraphSet(role, str(path), path.parent, spec, "ONNX export folder")
    for folder in (path / "onnx", path):
        if path.is_dir() and (folder / SIDECAR_FILE).is_file():
            return GraphSet(role, source, folder, read_graph_spec(folder), "ONNX export folder")
    return None


def check_shapes(graphs: GraphSet, config: BenchConfig) -> None:
    """Fixed-shape graphs must match --batch/--seqlen."""
    spec = graphs.spec
    if spec.batch is not None and spec.batch != config.batch:
        raise ConfigError(f"{graphs.source} was exported for batch {spec.batch}; use --batch {spec.batch} or re-export")
    if spec.seqlen is not None and spec.seqlen != config.seqlen:
        raise ConfigError(
            f"{graphs.source} was exported for {spec.seqlen} tokens; use --seqlen {spec.seqlen} or re-export"
        )
