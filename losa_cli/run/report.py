"""``report.md`` and its PNGs for ``losa run``, written from the stages' manifests.

Everything in the report is read back from the ``losa_manifest.json`` of each stage folder, so
a report is the same whether a stage ran now or was skipped because an earlier run finished it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

from ..core.manifest import lineage, manifest_hash, read_manifest
from ..core.plots import plot_allocation, plot_losses


@dataclass
class ReportFiles:
    report: Path
    plots: list[Path] = field(default_factory=list)


REPORT_NAME = "report.md"
_NUMBER = re.compile(r"^[*`]*[-+]?[0-9.]+(?:e[-+]?[0-9]+)?(?: s|x|%)?[*`]*$|^-$")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; columns of numbers are right-aligned."""
    numeric = [bool(rows) and all(_NUMBER.match(str(row[i])) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def disk_usage(folders: list[Path]) -> list[tuple[int, int]]:
    """(bytes first stored in each folder, bytes hard-linked to an earlier folder's files), in order.

    A file linked into several stages (``losa export`` links weights identical to its input's)
    is counted once, in the first folder that holds it."""
    seen: set[tuple[int, int]] = set()
    usage = []
    for folder in folders:
        new = shared = 0
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if not path.is_file() or path.is_symlink():
                continue
            stat = path.stat()
            key = (stat.st_dev, stat.st_ino)
            if key in seen:
                shared += stat.st_size
            else:
                seen.add(key)
                new += stat.st_size
        usage.append((new, shared))
    return usage


def _size(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB"


def _stages_section(out: Path, stages: list[dict]) -> list[str]:
    usage = disk_usage([Path(s["folder"]) for s in stages])
    rows = [[s["name"], s["status"], f"`{os.path.relpath(s['folder'], out)}/`", f"{s['wall_time_s']:.1f} s",
             _size(new) + (f" (+{_size(shared)} linked)" if shared else ""), f"`{s['manifest_sha256'][:12]}`"]
            for s, (new, shared) in zip(stages, usage)]
    rows.append(["all stages", "", "", "", f"**{_size(sum(new for new, _ in usage))}**", ""])
    return ["## Stages", "", *_table(["stage", "this run", "folder", "time", "on disk", "manifest sha256"], rows),
            "On disk: bytes of the stage folder's files; a file hard-linked to an earlier stage's identical file "
            "(the export's weights when they equal the recovered model's) is counted once, where it first appears.", ""]


def _blocks_section(out: Path, manifests: dict[str, dict], plots: list[Path]) -> list[str]:
    source = "recover" if "recover" in manifests else "prune" if "prune" in manifests else None
    if source is None:
        return []
    results = manifests[source]["results"]
    rates, zeros, ranks = results.get("per_block_rates"), results.get("per_block_sparsity") or [], results.get("ranks")
    lines = ["## Per-block rates and ranks", "",
             f"From the {source} stage: target rate and measured zeros of every decoder block"
             + (", and its final LoRA rank." if ranks else "."), ""]
    header = ["block", "target rate", "zeros"] + (["rank"] if ranks else [])
    rows = []
    for index, measured in enumerate(zeros):
        row = [str(index), _fmt(rates[index] if rates else None), _fmt(measured)]
        if ranks:
            row.append(str(ranks[index]))
        rows.append(row)
    lines += _table(header, rows)
    similarity = (results.get("allocation") or {}).get("similarity")
    plot = plot_allocation(
        out / "allocation.png",
        f"{source}: {results.get('global_sparsity', 0):.1%} zeros",
        zeros,
        rates,
        ranks,
        similarity,
    )
    plots.append(plot)
    lines += ["![per-block sparsity and ranks](allocation.png)", ""]
    if source == "recover":
        stage_rows = []
        for s in results.get("stages", []):
            losses = s.get("losses") or []
            stage_rows.append(
                [
                    str(s["stage"]),
                    _fmt(s["target_sparsity"], ".3f"),
                    _fmt(s["sparsity"]),
                    _fmt(sum(s["ranks"]) / len(s["ranks"]) if s["ranks"] else None, ".2f"),
                    str(s["steps"]),
                    _fmt(losses[0] if losses else None, ".3f"),
                    _fmt(losses[-1] if losses else None, ".3f"),
                ]
            )
        lines += [
            "LoSA schedule:",
            "",
            *_table(["stage", "target", "zeros", "mean rank", "steps", "first loss", "last loss"], stage_rows),
        ]
        loss_plot = plot_losses(out / "loss.png", results.get("stages", []))
        if loss_plot is not None:
            plots.append(loss_plot)
            lines += ["![training loss](loss.png)", ""]
    return lines


def _perplexity_section(manifests: dict[str, dict]) -> list[str]:
    if "eval" not in manifests:
        return []
    results = manifests["eval"]["results"]
    rows = []
    for label, key in (("input (dense)", "input"), ("final (sparse)", "final")):
        p = (results.get(key) or {}).get("perplexity")
        if p:
            rows.append(
                [
                    label,
                    f"`{results[key]['model']}`",
                    f"{p['perplexity']:.4f}",
                    f"{p['windows']} x {p['seqlen']}",
                    str(p["predicted_tokens"]),
                    "yes" if p["bos_per_window"] else "no",
                    f"{p['dtype']} on {p['device']}",
                ]
            )
    lines = ["## Perplexity before and after", ""]
    lines += _table(
        ["model", "folder", "perplexity", "windows x tokens", "predicted tokens", "BOS per window", "dtype"], rows
    )
    before, after = results.get("perplexity_before"), results.get("perplexity_after")
    if before and after:
        perplexity = (results.get("final") or {}).get("perplexity", {})
        data, encoding = perplexity.get("data"), perplexity.get("encoding")
        read_as = f" (read as {encoding})" if encoding not in (None, "utf-8") else ""
        lines += [
            f"Same windows of `{data}`{read_as} for both models: perplexity x{after / before:.2f} "
            f"({before:.2f} -> {after:.2f}).",
            "",
        ]
    return lines


def _accuracy_section(manifests: dict[str, dict]) -> list[str]:
    """Multiple-choice accuracy of the input and final models, when the eval stage ran ``tasks``."""
    results = manifests.get("eval", {}).get("results", {})
    before, after = ((results.get(key) or {}).get("zeroshot") for key in ("input", "final"))
    if not before or not after:
        return []
    rows = [
        [
            b["task"],
            b["version"],
            str(b["num_fewshot"]),
            str(b["samples"]),
            _fmt(b["acc"]),
            _fmt(a["acc"]),
            _fmt(b["acc_norm"]),
            _fmt(a["acc_norm"]),
        ]
        for b, a in zip(before["tasks"], after["tasks"])
    ]
    lines = [f"## Accuracy before and after (lm-eval {after['lm_eval_version']})", ""]
    return lines + _table(
        ["task", "version", "shots", "n", "acc input", "acc final", "acc_norm input", "acc_norm final"], rows
    )


def _sparsity_section(manifests: dict[str, dict], final_stage: str | None) -> list[str]:
    lines = ["## Sparsity verified", ""]
    items = []
    if "eval" in manifests:
        sparsity = manifests["eval"]["results"].get("final", {}).get("sparsity") or {}
        if sparsity:
            items.append(
                f"- Counted from the final model's weights: **{sparsity['global_sparsity']:.4%}** of the decoder "
                f"blocks' linear weights are zero (mask sha256 `{sparsity['mask_checksum'][:16]}`)."
            )
    if "recover" in manifests:
        r = manifests["recover"]["results"]
        items.append(
            "- recover: each stage's zeros checked to contain the stage before's, and every pruned weight checked "
            "to be "
            "exactly zero after the final merge; "
            f"{r['global_sparsity']:.4%} zeros, mask sha256 `{r['mask_checksum'][:16]}`."
        )
    elif "prune" in manifests:
        r = manifests["prune"]["results"]
        items.append(f"- prune: {r['global_sparsity']:.4%} zeros, mask sha256 `{r['mask_checksum'][:16]}`.")
    if "export" in manifests:
        r = manifests["export"]["results"]
        items.append(
            f"- export: {r['global_sparsity']:.4%} zeros in the saved safetensors, mask sha256 "
            f"`{r['mask_checksum'][:16]}`."
        )
        onnx = r.get("onnx")
        if onnx:
            v = onnx["verification"]
            mismatches = len(v.get("zero_mismatches") or [])
            greedy = {True: "match", False: "DIFFER", None: "not checked"}[v.get("greedy_match")]
            items.append(
                f"- ONNX: {v['weights_checked'] - mismatches}/{v['weights_checked']} pruned weights have identical "
                f"zeros in the graphs; max |logits diff| {_fmt(v.get('prefill_max_abs_diff'), '.3g')} (prefill), "
                f"{_fmt(v.get('decode_max_abs_diff'), '.3g')} (decode); greedy tokens {greedy}."
            )
    checksums = {
        name: m["results"].get("mask_checksum")
        for name, m in manifests.items()
        if name in ("prune", "recover", "export") and m["results"].get("mask_checksum")
    }
    if "eval" in manifests:
        final_sparsity = manifests["eval"]["results"].get("final", {}).get("sparsity") or {}
        if final_sparsity.get("mask_checksum"):
            checksums["eval (final model)"] = final_sparsity["mask_checksum"]
    if final_stage in ("recover", "export") and "recover" in checksums and "export" in checksums:
        same = checksums["recover"] == checksums["export"]
        items.append(f"- The exported model has {'the same' if same else 'a DIFFERENT'} mask as the recovered one.")
    return lines + (items or ["- nothing to verify: no stage made a sparse model"]) + [""]


def _speed_section(out: Path, manifests: dict[str, dict], plots: list[Path]) -> list[str]:
    if "bench" not in manifests:
        return []
    results = manifests["bench"]["results"]
    settings = results["settings"]
    lines = [
        "## Speed",
        "",
        f"Batch {settings['batch']}, prefill of {settings['seqlen']} tokens, decode of {settings['decode_tokens']} "
        f"tokens with a past of {settings['seqlen']}; {settings['threads']} thread(s); {settings['iterations']} timed "
        f"runs after {settings['warmup']} warm-up. Sparse: `{results['model']}` "
        f"({_fmt(results['sparse'].get('matmul_zero_fraction'), '.1%')} zeros in MatMul weights); dense: "
        f"`{results['dense']['source']}`.",
        "",
    ]
    rows = [
        [
            r["phase"],
            r["sparse"],
            r["dense"],
            f"{r['dense_median_ms']:.2f}",
            f"{r['sparse_median_ms']:.2f}",
            f"**{r['speedup']:.2f}x**",
        ]
        for r in results.get("speedups", [])
    ]
    lines += _table(["phase", "sparse", "dense", "dense median ms", "sparse median ms", "speed-up"], rows)
    run_rows = []
    for r in results.get("runs", []):
        t, ceiling, accuracy = r.get("timing"), r.get("ceiling"), r.get("accuracy") or {}
        run_rows.append([
            r["engine"], r["model"], r.get("precision", "fp32"), r["phase"], _fmt(t and t["median_ms"], ".2f"),
            _fmt(t and t["p90_ms"], ".2f"), _fmt(t and t["tokens_per_s"], ".1f") if t else f"failed: {r.get('error')}",
            f"{ceiling['ceiling_ms']:.2f} ({ceiling['format']})" if ceiling else "",
            f"{ceiling['share']:.0%}" if ceiling else "", _fmt(accuracy.get("perplexity"), ".2f"),
            _fmt(accuracy.get("top1_agreement"), ".1%"),
        ])
    lines += _table(["engine", "model", "precision", "phase", "median ms", "p90 ms", "tokens/s", "ceiling ms", "share",
                     "perplexity", "top-1 = fp32"], run_rows)
    if settings.get("data"):
        lines += [f"Perplexity of each row's exact format on {settings['data_windows']} windows x "
                  f"{settings['data_seqlen']} tokens of `{settings['data']}`; top-1 = fp32: the share of positions "
                  "whose next-token argmax equals the fp32 sparse model's (teacher-forced).", ""]
    if machine_bandwidth := results.get("machine", {}).get("read_bandwidth_gb_s"):
        lines += [
            f"Ceiling: the bytes one batch-1 decode step reads in the engine's weight format (dense for ONNX Runtime, "
            "for DeepSparse per layer the smaller of dense and packed values + 1-bit mask, for losa the bytes of "
            "its own "
            f"packed layers) over the measured read bandwidth, "
            f"{machine_bandwidth:.1f} GB/s; share = ceiling / median.",
            "",
        ]
    machine = results.get("machine", {})
    load = results.get("load_average_before"), results.get("load_average_after")
    lines += [
        f"Machine: {machine.get('cpu')} ({machine.get('cores')} cores); load average "
        f"{_fmt(load[0][0] if load[0] else None, '.2f')} before, {_fmt(load[1][0] if load[1] else None, '.2f')} after.",
        "",
    ]
    lines += [f"Note: {n}" for n in results.get("notes", [])] + [""]
    if (out / "bench" / "speed.png").is_file():
        plots.append(out / "bench" / "speed.png")
        lines += ["![latency](bench/speed.png)", ""]
    return lines


def _lineage_section(final_model: str) -> list[str]:
    folder = Path(final_model)
    if not folder.is_dir():
        return []
    chain = lineage(folder)
    if not chain:
        return []
    lines = [
        "## Lineage",
        "",
        f"`losa inspect {final_model}` shows this chain (each manifest names its parent by hash):",
        "",
    ]
    for depth, manifest in enumerate(chain):
        parent = manifest.get("parent_manifest")
        link = f", parent sha256 `{parent['sha256'][:12]}`" if parent else ""
        lines.append(
            f"{'  ' * depth}- `{manifest['command']}` ({manifest.get('created')}): sha256 "
            f"`{manifest_hash(manifest)[:12]}`{link}"
        )
    return lines + [""]


def write_report(out: Path, recipe: dict, stages: list[dict], final_model: str, command: str) -> ReportFiles:
    """Write ``OUT/report.md`` (and ``allocation.png``, ``loss.png``) from the stages' manifests."""
    out = Path(out)
    manifests = {s["name"]: read_manifest(Path(s["folder"])) for s in stages}
    manifests = {k: v for k, v in manifests.items() if v is not None}
    final_stage = next((s["name"] for s in stages if str(Path(s["folder"])) == str(Path(final_model))), None)
    plots: list[Path] = []
    lines = [
        "# losa run report",
        "",
        f"Written {datetime.now(UTC).isoformat(timespec='seconds')}. Reproduce (finished stages are skipped, "
        f"`--restart` redoes them):",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    lines += _stages_section(out, stages)
    lines += _blocks_section(out, manifests, plots)
    lines += _perplexity_section(manifests)
    lines += _accuracy_section(manifests)
    lines += _sparsity_section(manifests, final_stage)
    lines += _speed_section(out, manifests, plots)
    lines += _lineage_section(final_model)
    warnings = [f"- {s['name']}: {w}" for s in stages for w in s.get("warnings", [])]
    if warnings:
        lines += ["## Warnings", "", *warnings, ""]
    lines += [
        "## Settings",
        "",
        "The resolved recipe (also in `recipe.yaml`):",
        "",
        "```yaml",
        yaml.safe_dump(recipe, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    path = out / REPORT_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return ReportFiles(path, plots)
