"""Workflow of ``losa run``: prune -> recover -> export -> bench (and eval) from one recipe.

Level 1.5 of the house plan: the one workflow that calls other workflows.  The rule "never
sideways between workflows" is relaxed here on purpose -- this module orchestrates
``run_prune``, ``run_recover``, ``run_export``, ``run_bench`` and ``run_eval`` (and nothing else
calls it but the CLI); the workflows themselves still never import each other.

check:  the whole recipe (keys, types, values, cross-stage combinations, input paths, --out) is
        checked before any work starts; every problem is reported in one ConfigError.
stages: each stage writes its own folder under --out with its ``losa_manifest.json`` (prune,
        recover and export through their workflows; bench and eval here), and a
        ``losa_run_stage.json`` marker recording the stage's settings hash = sha256 of its
        resolved settings + the fingerprints of its inputs (the parent stage's manifest hash, or
        the input model's files).  A stage whose folder holds a marker with the same hash, and a
        manifest whose hash matches the marker's, is skipped; anything else is redone.  So a run
        that crashed continues where it stopped, and changing a setting redoes that stage and the
        ones after it (their parent's manifest hash changes).  An interrupted recover stage with
        a checkpoint made by the same settings is resumed from that checkpoint.
report: ``report.md`` and PNGs in --out, from the stages' manifests (``report.py``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from ..core.atomic import atomic_folder, disk_errors, output_problem
from ..core.config import AUTO_ENCODING, to_dict
from ..core.data import HUB_DATASETS, load_documents
from ..core.errors import ConfigError, LosaError
from ..core.manifest import build_manifest, manifest_hash, read_manifest, write_manifest
from ..core.sequential import ProgressFn
from ..export import bench_graphs, run_export
from ..prune import run_prune
from ..recover import STATE_FILE, run_recover
from ..runtime import plot_report, resolve_tasks, run_bench, run_eval
from .markers import (
    DATA_KEYS,
    STAGE_MARKER,
    completed_marker,
    input_fingerprint,
    read_json,
    stage_hash,
    stage_marker,
    write_json,
)
from .plan import StagePlan, collect_recipe, dump_recipe, final_model_stage, format_problems
from .recipe import Recipe, RunConfig
from .report import write_report

RUN_RECORD = "losa_run.json"
RECIPE_COPY = "recipe.yaml"
SPEED_CHART = "speed.png"


@dataclass
class StageOutcome:
    """What happened to one stage in this run."""

    name: str
    folder: str
    status: str  # ran | resumed | skipped
    settings_sha256: str
    manifest_sha256: str
    wall_time_s: float  # of the run that made the folder (an earlier one when skipped)
    warnings: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    out: str
    recipe: dict
    stages: list[StageOutcome]
    final_model: str
    report: str
    plots: list[str]
    perplexity_before: float | None
    perplexity_after: float | None
    global_sparsity: float | None
    speedups: list[dict]
    warnings: list[str]
    wall_time_s: float

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- checks before any work


def _is_hub_dataset(value: str) -> bool:
    return value in HUB_DATASETS and not Path(value).exists()


def input_problems(recipe: Recipe, out: Path) -> list[str]:
    """Inputs that do not exist, and an --out that is not a losa run folder."""
    from ..core.errors import ModelError
    from ..core.modeling import resolve_source

    found = []
    try:
        resolve_source(recipe.model)
    except ModelError as exc:
        found.append(f"model: {exc}")
    for name in recipe.stages():
        section = recipe.section(name)
        for key in DATA_KEYS:
            value = section.get(key)
            if not isinstance(value, str) or not value or _is_hub_dataset(value):
                continue
            if not Path(value).expanduser().exists():
                found.append(
                    f"{name}.{key}: {value} does not exist (paths are relative to the current folder, {Path.cwd()})"
                )
            elif key != "per_layer" and (  # per_layer: its config reads it when the recipe is planned
                problem := _unreadable_input(name, key, value, section.get("encoding") or AUTO_ENCODING)
            ):
                found.append(problem)
        if name == "eval" and section.get("tasks"):
            try:
                resolve_tasks(list(section["tasks"]))
            except LosaError as exc:
                found.append(f"eval.tasks: {exc.render(name) if isinstance(exc, ConfigError) else exc}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RUN_RECORD).is_file())):
        found.append(f"--out {out} exists and is not a losa run folder (no {RUN_RECORD}); choose another folder")
    elif problem := output_problem(out, (recipe.model,)):
        found.append(problem)
    return found


def _unreadable_input(section: str, key: str, value: str, encoding: str) -> str | None:
    """Why a stage's input file cannot be used, read now so that a later stage's bad file fails before the
    earlier stages run for hours (None when it reads); the stage reads it again when it runs."""
    try:
        load_documents(value, encoding, f"{section}.{key}", [])
    except LosaError as exc:
        return f"{section}.{key}: {exc}"
    return None


# ----------------------------------------------------------------------------- stages


def _prefixed(progress: ProgressFn | None, stage: str) -> ProgressFn | None:
    if progress is None:
        return None

    def report(description: str, done: int, total: int, info: str = "") -> None:
        progress(f"{stage}: {description}", done, total, info)

    return report


def _bench_stage(config, folder: Path, settings_sha256: str, progress: ProgressFn | None) -> tuple[dict, list[str]]:
    started = time.perf_counter()
    with atomic_folder(folder) as staging:
        with bench_graphs(config, progress) as graphs:
            result = run_bench(config, graphs, progress)
        plot_report(staging / SPEED_CHART, result)
        result.report = str(folder / SPEED_CHART)
        results = result.to_dict()
        (staging / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
        model = Path(config.model)
        dense = read_manifest(Path(config.dense_baseline))
        inputs = {
            "model": config.model,
            "dense_baseline": config.dense_baseline,
            "dense_baseline_manifest_sha256": manifest_hash(dense) if dense else None,
        }
        manifest = build_manifest(
            "bench", inputs, to_dict(config), results, parent_folder=model if model.is_dir() else None
        )
        write_manifest(staging, manifest)
        elapsed = time.perf_counter() - started
        write_json(staging / STAGE_MARKER, stage_marker("bench", settings_sha256, manifest, elapsed, "ran"))
    return manifest, result.warnings


def _eval_stage(
    config, input_model: str, folder: Path, settings_sha256: str, progress: ProgressFn | None
) -> tuple[dict, list[str]]:
    """Perplexity of the input model and of the final model on the same windows, and the final zeros."""
    started = time.perf_counter()
    before = run_eval(replace(config, model=input_model, sparsity=False), _prefixed(progress, "input model"))
    after = run_eval(config, _prefixed(progress, "final model"))
    warnings = [f"input model: {w}" for w in before.warnings] + [f"final model: {w}" for w in after.warnings]
    results = {
        "input": before.to_dict(),
        "final": after.to_dict(),
        "perplexity_before": before.perplexity.perplexity if before.perplexity else None,
        "perplexity_after": after.perplexity.perplexity if after.perplexity else None,
        "global_sparsity": after.sparsity.global_sparsity if after.sparsity else None,
        "warnings": warnings,
    }
    with atomic_folder(folder) as staging:
        (staging / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        model = Path(config.model)
        inputs = {
            "input_model": input_model,
            "final_model": config.model,
            "data": config.data,
            "data_encoding": after.perplexity.encoding if after.perplexity else None,
        }
        manifest = build_manifest(
            "eval", inputs, to_dict(config), results, parent_folder=model if model.is_dir() else None
        )
        write_manifest(staging, manifest)
        elapsed = time.perf_counter() - started
        write_json(staging / STAGE_MARKER, stage_marker("eval", settings_sha256, manifest, elapsed, "ran"))
    return manifest, warnings


def _run_stage(
    plan: StagePlan, folder: Path, settings_sha256: str, recipe: Recipe, restart: bool, progress: ProgressFn | None
) -> tuple[str, list[str]]:
    """Run one stage into ``folder`` (replacing whatever is there); return its status and warnings."""
    pending_path = folder.parent / f".{folder.name}.pending.json"
    pending = read_json(pending_path)
    write_json(pending_path, {"stage": plan.name, "settings_sha256": settings_sha256})
    started = time.perf_counter()
    status = "ran"
    config = plan.config
    if plan.name == "prune":
        warnings = run_prune(config, progress).warnings
    elif plan.name == "recover":
        checkpoint = folder.parent / f"{folder.name}.checkpoint"
        resume = (
            not restart
            and (checkpoint / STATE_FILE).is_file()
            and pending is not None
            and pending.get("settings_sha256") == settings_sha256
        )
        result = run_recover(replace(config, resume=True) if resume else config, progress)
        status = "resumed" if result.resumed_from else "ran"
        warnings = result.warnings
    elif plan.name in ("export", "dense-export"):
        warnings = run_export(config, progress).warnings
    elif plan.name == "bench":
        _, warnings = _bench_stage(config, folder, settings_sha256, progress)
    elif plan.name == "eval":
        _, warnings = _eval_stage(config, recipe.model, folder, settings_sha256, progress)
    else:  # pragma: no cover - plan_stages makes only the stages above
        raise LosaError(f"unknown stage {plan.name}")
    if plan.name not in ("bench", "eval"):  # workflows wrote the folder; mark it complete now
        manifest = read_manifest(folder)
        elapsed = time.perf_counter() - started
        write_json(folder / STAGE_MARKER, stage_marker(plan.name, settings_sha256, manifest, elapsed, status))
    pending_path.unlink(missing_ok=True)
    return status, warnings


# ----------------------------------------------------------------------------- the run


def _record(out: Path, recipe: Recipe, outcomes: list[StageOutcome], state: str, started: str) -> None:
    write_json(
        out / RUN_RECORD,
        {
            "losa_run_version": 1,
            "state": state,
            "argv": sys.argv,
            "started": started,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
            "recipe": recipe.to_dict(),
            "stages": [asdict(o) for o in outcomes],
        },
    )


def run_pipeline(config: RunConfig, progress: ProgressFn | None = None) -> RunResult:
    """``losa run``: check everything, then run (or skip) each stage in order, then write the report."""
    out = Path(config.out).expanduser().resolve()
    recipe, plans, problems = collect_recipe(config.recipe, config.overrides, out)
    problems += input_problems(recipe, out)
    if problems:
        raise ConfigError(format_problems(problems, config.recipe))
    with disk_errors(out):  # the stages' folders are atomic; the run's own records are replaced whole
        return _run_stages(config, recipe, plans, out, progress)


def _run_stages(config: RunConfig, recipe: Recipe, plans: list[StagePlan], out: Path,
                progress: ProgressFn | None) -> RunResult:
    """Run (or skip) each checked stage in order, then write the report."""
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# The resolved recipe of this run. Re-run (skipping finished stages) with:\n"
        f"#   losa run {out / RECIPE_COPY} --out {out}\n"
    )
    (out / RECIPE_COPY).write_text(dump_recipe(recipe, header))
    fingerprints: dict[str, dict] = {"input": input_fingerprint(recipe.model)}
    outcomes: list[StageOutcome] = []
    _record(out, recipe, outcomes, "running", started_at)
    for index, plan in enumerate(plans):
        if progress:
            progress("losa run", index, len(plans), plan.name)
        folder = out / plan.folder
        settings_sha256 = stage_hash(plan, fingerprints)
        marker = None if config.restart else completed_marker(folder, settings_sha256)
        if marker is not None:
            status = "skipped"
            manifest = read_manifest(folder)
            warnings = list(manifest.get("results", {}).get("warnings") or [])
        else:
            status, warnings = _run_stage(
                plan, folder, settings_sha256, recipe, config.restart, _prefixed(progress, plan.name)
            )
            manifest = read_manifest(folder)
            marker = read_json(folder / STAGE_MARKER) or {}
        fingerprints[plan.name] = {"manifest": manifest_hash(manifest)}
        outcomes.append(
            StageOutcome(
                plan.name,
                str(folder),
                status,
                settings_sha256,
                manifest_hash(manifest),
                float(marker.get("wall_time_s", 0.0)),
                warnings,
            )
        )
        _record(out, recipe, outcomes, "running", started_at)
    if progress:
        progress("losa run", len(plans), len(plans), "report")
    final_stage = final_model_stage(recipe)
    final_model = str(out / final_stage) if final_stage != "input" else recipe.model
    written = write_report(
        out, recipe.to_dict(), [asdict(o) for o in outcomes], final_model, f"losa run {out / RECIPE_COPY} --out {out}"
    )
    _record(out, recipe, outcomes, "finished", started_at)
    evaluation = read_manifest(out / "eval") if recipe.section("eval") is not None else None
    eval_results = (evaluation or {}).get("results", {})
    bench = read_manifest(out / "bench") if recipe.section("bench") is not None else None
    final_manifest = read_manifest(Path(final_model)) if final_stage != "input" else None
    sparsity = eval_results.get("global_sparsity")
    if sparsity is None and final_manifest is not None:
        sparsity = final_manifest.get("results", {}).get("global_sparsity")
    return RunResult(
        out=str(out),
        recipe=recipe.to_dict(),
        stages=outcomes,
        final_model=final_model,
        report=str(written.report),
        plots=[str(p) for p in written.plots],
        perplexity_before=eval_results.get("perplexity_before"),
        perplexity_after=eval_results.get("perplexity_after"),
        global_sparsity=sparsity,
        speedups=(bench or {}).get("results", {}).get("speedups", []),
        warnings=[f"{o.name}: {w}" for o in outcomes for w in o.warnings],
        wall_time_s=time.perf_counter() - started,
    )
