"""A recipe planned once: the stages of a ``losa run``, their configs, and every problem found before any work.

``collect_recipe`` reads (or takes the built-in default), overrides, parses and plans: each stage's
config is built once -- and so validated once, by the config itself -- with its input chained
from the stage before.  A stage's problems are shown in recipe terms (``recover.rank_max``), the
same problems the command line shows as options (``--rank-max``).  The pipeline runs these plans.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..core.config import Device
from ..core.errors import ConfigError
from ..core.settings import bounded, shown
from ..export import ExportConfig
from ..prune import PruneConfig
from ..recover import RECOVER_SPARSITY
from ..runtime import BenchConfig, EvalConfig
from .recipe import DEFAULT_RECIPE, SECTIONS, Recipe, apply_overrides, parse_recipe, read_recipe_file, stage_config


@dataclass
class StagePlan:
    """One stage of a run: its folder name, its config, and the stages/inputs it reads."""

    name: str
    folder: str
    config: Any
    parents: list[str]  # stage names, or "input" for the recipe's model


def _built(name: str, problems: list[str], make: Callable[..., Any], *args: Any, **kwargs: Any) -> Any | None:
    """``make(*args, **kwargs)``, or None with its problems added in the terms of recipe section ``name``."""
    try:
        return make(*args, **kwargs)
    except ConfigError as exc:
        problems.append(f"{name}: {exc.render(name)}")
        return None


def plan_stages(recipe: Recipe, out: Path, problems: list[str]) -> list[StagePlan]:
    """The stages to run, in order, with their configs; inputs chained prune -> recover -> export.

    ``dense-export`` (the dense input model exported with the export settings) is added when
    ``bench`` runs: it is the bench's dense baseline.  ``eval`` measures the input model and the
    final model on the same windows.  A stage whose config has problems adds them and is left out.
    """
    common = {"trust_remote_code": recipe.trust_remote_code}
    writes = {**common, "force": True}  # a stage whose folder is stale is redone (pipeline.py decides which)
    plans: list[StagePlan] = []
    current, current_stage = recipe.model, "input"

    def add(name: str, parents: list[str], make: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        config = _built("export" if name == "dense-export" else name, problems, make, *args, **kwargs)
        if config is not None:
            plans.append(StagePlan(name, name, config, parents))
        return config is not None

    for name in ("prune", "recover"):
        section = recipe.section(name)
        if section is None:
            continue
        settings = {"device": recipe.device, **section}
        add(name, [current_stage], stage_config, name, settings, recipe.seed, model=current, out=str(out / name),
            **writes)
        current, current_stage = str(out / name), name
    export = recipe.section("export")
    if export is not None:
        add("export", [current_stage], ExportConfig, model=current, out=str(out / "export"), **writes, **export)
        current, current_stage = str(out / "export"), "export"
    bench = recipe.section("bench")
    if bench is not None:
        dense_settings = {**(export or {}), "onnx": True, "safetensors": False}  # the input model holds its weights
        dense_ok = add("dense-export", ["input"], ExportConfig, model=recipe.model, out=str(out / "dense-export"),
                       **writes, **dense_settings)
        if not dense_ok and export is not None:
            problems.pop()  # the same settings as export: its problems are reported there
        add("bench", [current_stage, "dense-export"], BenchConfig, model=current,
            dense_baseline=str(out / "dense-export"), **common, **bench)
    evaluation = recipe.section("eval")
    if evaluation is not None:
        settings = {"device": recipe.device, **evaluation}
        add("eval", [current_stage, "input"], EvalConfig, model=current, sparsity=True, **common, **settings)
    return plans


def final_model_stage(recipe: Recipe) -> str:
    """The stage whose folder holds the finished model ("input" when no stage makes one)."""
    for name in ("export", "recover", "prune"):
        if recipe.section(name) is not None:
            return name
    return "input"


def _cross_stage_problems(recipe: Recipe) -> list[str]:
    """Combinations that each stage accepts alone but that cannot work together."""
    found = []
    prune, recover, export, bench, evaluation = (recipe.section(n) for n in SECTIONS)
    if not recipe.stages():
        found.append("the recipe runs no stage: give at least one of " + ", ".join(SECTIONS))
    if prune is not None and recover is not None:
        prune_pattern, recover_pattern = prune.get("pattern"), recover.get("pattern")
        if prune_pattern and recover_pattern != prune_pattern:
            found.append(
                f"prune.pattern {prune_pattern} needs recover.pattern {prune_pattern} too: recover would prune "
                "unstructured on top and break the N:M pattern"
            )
        prune_sparsity = prune.get("sparsity", PruneConfig.sparsity)
        recover_sparsity = recover.get("sparsity")
        if recover_sparsity is None:
            recover_sparsity = RECOVER_SPARSITY
        if (
            not prune_pattern
            and not recover_pattern
            and not prune.get("per_layer")
            and recover_sparsity < prune_sparsity
        ):
            found.append(
                f"recover.sparsity {recover_sparsity} is below prune.sparsity {prune_sparsity}: recover never "
                "revives weights; raise recover.sparsity or lower prune.sparsity"
            )
    if bench is not None:
        exported = export or {}
        for name, default in (("batch", BenchConfig.batch), ("seqlen", BenchConfig.seqlen)):
            fixed = exported.get(name)
            wanted = bench.get(name, default)
            if fixed is not None and fixed != wanted:
                found.append(
                    f"export.{name} {fixed} fixes the ONNX graphs' {name}, but bench.{name} is {wanted}: make "
                    f"them equal or drop export.{name}"
                )
        if (
            not exported.get("decode", ExportConfig.decode)
            and bench.get("decode_tokens", BenchConfig.decode_tokens) > 0
        ):
            found.append(
                "bench.decode_tokens > 0 times the decode graph, but export.decode is false: "
                "set export.decode true or bench.decode_tokens 0"
            )
    if evaluation is not None and not evaluation.get("data"):
        found.append(
            "eval.data is required: the text to measure perplexity on before and after (.txt/.jsonl, or wikitext2)"
        )
    return found


def collect_recipe(path: str | None, overrides: list[str], out: Path) -> tuple[Recipe, list[StagePlan], list[str]]:
    """Read (or take the built-in default), override, parse, plan and check: the recipe, its stages
    (planned once) and every problem."""
    raw = copy.deepcopy(DEFAULT_RECIPE) if path is None else read_recipe_file(path)
    problems = apply_overrides(raw, list(overrides))
    recipe, parse_problems = parse_recipe(raw)
    problems += parse_problems
    if recipe.device not in set(Device):
        problems.append(f"device {shown(recipe.device)} is unknown; choose one of {', '.join(Device)}")
    plans = plan_stages(recipe, out, problems)
    problems += _cross_stage_problems(recipe)
    return recipe, plans, list(dict.fromkeys(problems))


def load_recipe(path: str | None, overrides: list[str] = (), out: Path = Path("OUT")) -> tuple[Recipe, list[StagePlan]]:
    """The checked recipe and its stages, or one ConfigError listing every problem."""
    recipe, plans, problems = collect_recipe(path, overrides, out)
    if problems:
        raise ConfigError(format_problems(problems, path))
    return recipe, plans


def format_problems(problems: list[str], path: str | None) -> str:
    """One line for every problem found (clipped: ``settings.bounded``)."""
    where = path or "the default recipe"
    count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
    return f"{where}: {count}, nothing was run: " + "; ".join(bounded(problems))


def dump_recipe(recipe: Recipe, header: str = "") -> str:
    """YAML text of a recipe (for ``recipe.yaml`` in the output folder)."""
    body = yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False)
    return header + body
