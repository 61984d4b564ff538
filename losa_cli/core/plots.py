"""PNG figures (matplotlib, headless): the per-block allocation, the similarity heatmap, the training loss."""

from __future__ import annotations

import os
from pathlib import Path


def plot_allocation(path: Path, title: str, sparsity: list[float], rates: list[float] | None,
                    ranks: list[int] | None, similarity: list[list[float]] | None) -> Path:
    """Bars of per-block zeros (and target rates, ranks), plus the RMI heatmap when given.

    Written to a temporary file and renamed, so a failed plot never leaves a broken PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + (ranks is not None) + (similarity is not None)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    blocks = list(range(len(sparsity)))
    ax = axes.pop(0)
    ax.bar(blocks, sparsity, color="#4c72b0", label="zeros (measured)")
    if rates is not None:
        ax.plot(blocks, rates, "o", color="#dd8452", markersize=4, label="target rate")
    low = min(sparsity + (rates or [])) if sparsity else 0.0
    ax.set_ylim(max(0.0, low - 0.1), min(1.0, max(sparsity + (rates or [0])) + 0.05))
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity")
    ax.set_title("per-block sparsity")
    ax.legend(loc="lower right")
    if ranks is not None:
        ax = axes.pop(0)
        ax.bar(blocks[: len(ranks)], ranks, color="#55a868")
        ax.set_xlabel("block")
        ax.set_ylabel("LoRA rank")
        ax.set_title("per-block rank")
    if similarity is not None:
        ax = axes.pop(0)
        image = ax.imshow(similarity, cmap="viridis", vmin=0.0, vmax=1.0)
        fig.colorbar(image, ax=ax, fraction=0.046)
        ax.set_xlabel("block")
        ax.set_ylabel("block")
        ax.set_title("block similarity (RMI / linear CKA)")
    fig.suptitle(title)
    return save_figure(fig, Path(path))


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically (temporary file + rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def plot_losses(path: Path, stages: list[dict]) -> Path | None:
    """Training loss over the steps of every recover stage (stage boundaries marked)."""
    losses = [(s["stage"], loss) for s in stages for loss in s.get("losses", [])]
    if not losses:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(range(1, len(losses) + 1), [loss for _, loss in losses], color="#4c72b0", linewidth=1)
    step = 0
    for s in stages[:-1]:
        step += len(s.get("losses", []))
        ax.axvline(step + 0.5, color="#999999", linewidth=0.8, linestyle=":")
    ax.set_xlabel("optimizer step (dotted: stage boundaries, pruning in between)")
    ax.set_ylabel("training loss")
    ax.set_title("LoSA fine-tuning loss")
    return save_figure(fig, path)
