"""Workflow of ``losa inspect``: what a model folder holds and how it was made.

Per-block sparsity is counted from the weights themselves (so it works on any model, pruned or
not); target rates, ranks, the block-similarity matrix and the lineage come from
``losa_manifest.json`` when the folder has one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.atomic import check_output
from ..core.errors import ConfigError
from ..core.manifest import lineage
from ..core.modeling import load_model, sparsity_report
from ..core.plots import plot_allocation


@dataclass
class InspectResult:
    model: str
    global_sparsity: float
    per_block_sparsity: list[float]
    per_layer_sparsity: dict[str, float]
    mask_checksum: str
    per_block_rates: list[float] | None
    ranks: list[int] | None
    allocation: str | None
    similarity: list[list[float]] | None
    lineage: list[dict]
    plot: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def run_inspect(
    model: str, plot: str | None = None, force: bool = False, trust_remote_code: bool = False
) -> InspectResult:
    """Count zeros per block, read what the manifest chain says, and draw the PNG if asked."""
    if plot is not None:
        if not plot.lower().endswith(".png"):
            raise ConfigError(f"--plot {plot}: give a .png file name")
        check_output(plot, force, option="--plot", folder=False)
    loaded = load_model(model, "float32", trust_remote_code)
    per_layer, per_block, global_sparsity, checksum = sparsity_report(loaded.model)
    chain = lineage(Path(loaded.source.location)) if loaded.source.is_local else []
    results = chain[0].get("results", {}) if chain else {}
    allocation = results.get("allocation") or {}
    result = InspectResult(
        model=model,
        global_sparsity=global_sparsity,
        per_block_sparsity=per_block,
        per_layer_sparsity=per_layer,
        mask_checksum=checksum,
        per_block_rates=results.get("per_block_rates"),
        ranks=results.get("ranks"),
        allocation=allocation.get("kind"),
        similarity=allocation.get("similarity"),
        lineage=[{"command": m.get("command"), "created": m.get("created"), "argv": m.get("argv")} for m in chain],
    )
    if plot is not None:
        title = f"{model}: {global_sparsity:.1%} zeros" + (
            f", {result.allocation} allocation" if result.allocation else ""
        )
        plot_allocation(Path(plot), title, per_block, result.per_block_rates, result.ranks, result.similarity)
        result.plot = plot
    return result
