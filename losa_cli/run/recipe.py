"""Recipes of ``losa run``: one YAML file -> the config of every stage, checked up front.

A recipe has top-level keys ``model``, ``seed``, ``device``, ``trust_remote_code`` and one
section per stage: ``prune``, ``recover``, ``export``, ``bench``, ``eval``.  A section that is
absent or ``null`` is not run.  A section's keys are the field names of that stage's config
dataclass (``config.py``); the calibration fields ``calib``, ``nsamples``, ``seqlen``, ``sampling``, ``encoding``
are given flat in ``prune`` / ``recover``.  What ``losa run`` sets itself (inputs, outputs, ``force``)
is refused with the reason.  Overrides ``section.key=value`` (``recover.total_steps=40``,
``prune=null``, ``model=some/folder``) are applied on top, the value read as YAML.

Every problem -- unknown keys, wrong types, bad values, impossible combinations across stages --
is collected and reported together before any work starts.

Level 5 of the house plan: standard library, ``yaml`` and ``config.py`` only.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from ..core.config import (
    DEFAULT_MODEL,
    DEVICES,
    BenchConfig,
    CalibrationConfig,
    EvalConfig,
    ExportConfig,
    RECOVER_SPARSITY,
    PruneConfig,
    RecoverConfig,
)
from ..core.errors import ConfigError

SECTIONS = ("prune", "recover", "export", "bench", "eval")
CONFIG_CLASSES = {"prune": PruneConfig, "recover": RecoverConfig, "export": ExportConfig, "bench": BenchConfig,
                  "eval": EvalConfig}
#: flat in prune / recover, mapped to CalibrationConfig
CALIBRATION_KEYS = ("calib", "nsamples", "seqlen", "sampling", "encoding")
TOP_LEVEL = {"model": str, "seed": int, "device": str, "trust_remote_code": bool}
DEFAULT_OUT = "runs/losa-run"

#: keys ``losa run`` sets itself, and why a recipe may not
_CHAINED = "losa run chains each stage's input from the one before; set the top-level model"
_MANAGED_ALL = {
    "model": _CHAINED,
    "out": "losa run writes every stage to a folder under --out",
    "force": "a stage whose settings changed is redone anyway; use losa run --restart to redo everything",
    "trust_remote_code": "set trust_remote_code at the top level",
}
_FLAT_CALIBRATION = "give calib, nsamples, seqlen, sampling and encoding flat in the section"
_MANAGED = {
    "prune": {"calibration": _FLAT_CALIBRATION, "seed": "set seed at the top level"},
    "recover": {"calibration": _FLAT_CALIBRATION, "seed": "set seed at the top level",
                "resume": "losa run resumes an interrupted recover stage by itself; --restart starts over"},
    "bench": {"dense_baseline": "losa run exports the dense input model as the baseline (dense-export stage)",
              "report": "the speed chart is written to OUT/bench/speed.png"},
    "eval": {"sparsity": "losa run always counts the final model's zeros"},
}

#: the built-in recipe of ``losa run`` without a config file; examples/default.yaml is this (tested)
DEFAULT_RECIPE: dict[str, Any] = {
    "model": DEFAULT_MODEL,
    "seed": 0,
    "device": "auto",
    "prune": None,
    "recover": {
        "sparsity": 0.7,
        "method": "wanda",
        "allocation": "rmi",
        "stages": 5,
        "total_steps": 64,
        "data": "../shared/data/c4-sample.txt",
        "loss": "kd",
        "lr": 3e-3,
        "calib": "../shared/data/c4-sample.txt",
        "nsamples": 32,
        "seqlen": 256,
        "rmi_samples": 32,
        "error_samples": 8,
        "max_length": 256,
        "batch_size": 4,
    },
    "export": {"onnx": True},
    "bench": {"engines": "onnxruntime,deepsparse,losa", "precisions": "fp32,bf16", "seqlen": 128, "decode_tokens": 8, "iterations": 5, "warmup": 1},
    "eval": {"data": "../shared/data/wiki-sample.txt", "seqlen": 512, "max_windows": 32},
}


@dataclass
class RunConfig:
    """Settings of ``losa run``: which recipe, the overrides, where to write, whether to start over."""

    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    out: str = DEFAULT_OUT
    restart: bool = False

    def validate(self) -> None:
        found = []
        if not self.out:
            found.append("--out is required: the folder for the run's stages and report")
        if self.recipe is not None and not Path(self.recipe).is_file():
            found.append(f"recipe {self.recipe} does not exist; give a YAML file (see examples/) or none for the default")
        if found:
            raise ConfigError("; ".join(found))


@dataclass
class Recipe:
    """A parsed recipe: top-level settings and the raw (key-checked, type-checked) sections."""

    model: str = DEFAULT_MODEL
    seed: int = 0
    device: str = "auto"
    trust_remote_code: bool = False
    sections: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any] | None:
        return self.sections.get(name)

    def stages(self) -> list[str]:
        return [name for name in SECTIONS if self.sections.get(name) is not None]

    def to_dict(self) -> dict[str, Any]:
        """The recipe as YAML-able data (what ``recipe.yaml`` in the output folder holds)."""
        data: dict[str, Any] = {"model": self.model, "seed": self.seed, "device": self.device}
        if self.trust_remote_code:
            data["trust_remote_code"] = True
        for name in SECTIONS:
            data[name] = copy.deepcopy(self.sections.get(name))
        return data


# ----------------------------------------------------------------------------- YAML without surprises


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``2:4`` as the base-60 integer 124 and ``1e-3`` as a string; not here."""


_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(
    r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def yaml_value(text: str) -> Any:
    """One YAML value (overrides): ``40`` -> 40, ``null`` -> None, ``2:4`` -> '2:4', ``1e-3`` -> 0.001."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def read_recipe_file(path: str) -> dict[str, Any]:
    """The recipe file as a mapping (an empty file is an empty recipe)."""
    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506
    except OSError as exc:
        raise ConfigError(f"cannot read the recipe {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; a recipe is a YAML file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of top-level keys and stage sections, got {type(data).__name__}")
    return data


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """Apply ``key=value`` / ``section.key=value`` overrides in place; return the problems."""
    problems = []
    for text in overrides:
        key, sep, value_text = text.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"override {text!r} is not key=value (e.g. recover.total_steps=40 or prune=null)")
            continue
        try:
            value = yaml_value(value_text)
        except yaml.YAMLError:
            problems.append(f"override {text!r}: the value is not valid YAML")
            continue
        section, dot, name = key.partition(".")
        if not dot:
            raw[key] = value
        elif section not in SECTIONS:
            problems.append(f"override {text!r}: {section!r} is not a stage section ({', '.join(SECTIONS)})")
        elif "." in name or not name:
            problems.append(f"override {text!r}: give section.key with one dot")
        else:
            current = raw.get(section)
            if not isinstance(current, dict):
                current = {}  # setting a key of an absent section turns that stage on
            raw[section] = {**current, name: value}
    return problems


# ----------------------------------------------------------------------------- keys and types


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    if get_origin(hint) is list:
        return f"a list of {_type_name(get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    return " or ".join(_type_name(a) for a in get_args(hint))


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(ok, value) for a YAML value against a dataclass field's type; ints are accepted as floats."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in get_args(hint):
            ok, converted = _coerce(value, option)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        converted = []
        for item in value:
            ok, item = _coerce(item, get_args(hint)[0])
            if not ok:
                return False, value
            converted.append(item)
        return True, converted
    return False, value


def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def section_keys(name: str) -> dict[str, Any]:
    """The keys a section accepts, with their types (calibration fields flat for prune/recover)."""
    types_ = {k: v for k, v in _field_types(CONFIG_CLASSES[name]).items()
              if k not in _MANAGED_ALL and k not in _MANAGED.get(name, {}) and k != "calibration"}
    if name in ("prune", "recover"):
        calibration = _field_types(CalibrationConfig)
        types_.update({k: calibration[k] for k in CALIBRATION_KEYS})
    return types_


def _unknown(where: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
    return f"{where}: unknown key {key!r}{hint}"


def _parse_section(name: str, raw: Any, problems: list[str]) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(f"{name}: a stage section is a mapping of settings (or null to skip the stage), got {raw!r}")
        return None
    allowed = section_keys(name)
    managed = {**_MANAGED_ALL, **_MANAGED.get(name, {})}
    parsed = {}
    for key, value in raw.items():
        key = str(key)
        if key in managed:
            problems.append(f"{name}.{key} cannot be set in a recipe: {managed[key]}")
            continue
        if key not in allowed:
            problems.append(_unknown(name, key, list(allowed)))
            continue
        if name == "bench" and key == "engines" and isinstance(value, list):
            value = ",".join(str(v) for v in value)  # engines: [onnxruntime, deepsparse]
        ok, converted = _coerce(value, allowed[key])
        if not ok:
            problems.append(f"{name}.{key} must be {_type_name(allowed[key])}, got {value!r}")
            continue
        parsed[key] = converted
    return parsed


def parse_recipe(raw: dict[str, Any]) -> tuple[Recipe, list[str]]:
    """Check keys and types; bad entries are dropped and listed, so value checks can still run."""
    problems: list[str] = []
    recipe = Recipe()
    for key, value in raw.items():
        key = str(key)
        if key in SECTIONS:
            recipe.sections[key] = _parse_section(key, value, problems)
        elif key in TOP_LEVEL:
            ok, converted = _coerce(value, TOP_LEVEL[key])
            if ok:
                setattr(recipe, key, converted)
            else:
                problems.append(f"{key} must be {_type_name(TOP_LEVEL[key])}, got {value!r}")
        else:
            problems.append(_unknown("recipe", key, [*TOP_LEVEL, *SECTIONS]))
    return recipe, problems


# ----------------------------------------------------------------------------- stage configs


@dataclass
class StagePlan:
    """One stage of a run: its folder name, its config, and the stages/inputs it reads."""

    name: str
    folder: str
    config: Any
    parents: list[str]  # stage names, or "input" for the recipe's model


def _split(section: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    calib = {k: v for k, v in section.items() if k in CALIBRATION_KEYS}
    rest = {k: v for k, v in section.items() if k not in CALIBRATION_KEYS}
    return calib, rest


def plan_stages(recipe: Recipe, out: str | Path) -> list[StagePlan]:
    """The stages to run, in order, with their configs; inputs chained prune -> recover -> export.

    ``dense-export`` (the dense input model exported with the export settings) is added when
    ``bench`` runs: it is the bench's dense baseline.  ``eval`` measures the input model and the
    final model on the same windows.
    """
    out = Path(out)
    common = {"trust_remote_code": recipe.trust_remote_code}
    plans: list[StagePlan] = []
    current, current_stage = recipe.model, "input"
    for name in ("prune", "recover"):
        section = recipe.section(name)
        if section is None:
            continue
        calib, rest = _split(section)
        rest.setdefault("device", recipe.device)
        config = CONFIG_CLASSES[name](model=current, out=str(out / name), **common, **rest,
                                      calibration=CalibrationConfig(**calib, seed=recipe.seed))
        plans.append(StagePlan(name, name, config, [current_stage]))
        current, current_stage = str(out / name), name
    export = recipe.section("export")
    if export is not None:
        plans.append(StagePlan("export", "export", ExportConfig(model=current, out=str(out / "export"), **common, **export),
                               [current_stage]))
        current, current_stage = str(out / "export"), "export"
    bench = recipe.section("bench")
    if bench is not None:
        dense_settings = {**(export or {}), "onnx": True, "safetensors": False}  # the input model holds its weights
        plans.append(StagePlan("dense-export", "dense-export",
                               ExportConfig(model=recipe.model, out=str(out / "dense-export"), **common, **dense_settings),
                               ["input"]))
        plans.append(StagePlan("bench", "bench", BenchConfig(model=current, dense_baseline=str(out / "dense-export"),
                                                             **common, **bench), [current_stage, "dense-export"]))
    evaluation = recipe.section("eval")
    if evaluation is not None:
        settings = {"device": recipe.device, **evaluation}
        plans.append(StagePlan("eval", "eval", EvalConfig(model=current, sparsity=True, **common, **settings),
                               [current_stage, "input"]))
    return plans


def final_model_stage(recipe: Recipe) -> str:
    """The stage whose folder holds the finished model ("input" when no stage makes one)."""
    for name in ("export", "recover", "prune"):
        if recipe.section(name) is not None:
            return name
    return "input"


_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")


def _in_recipe_terms(name: str, message: str) -> str:
    """Config messages name command-line flags; say ``recover.rank_max`` instead of ``--rank-max``."""
    keys = section_keys(name)

    def swap(match: re.Match) -> str:
        key = match.group(1).replace("-", "_")
        return f"{name}.{key}" if key in keys else match.group(0)

    return f"{name}: {_FLAG.sub(swap, message)}"


def _cross_stage_problems(recipe: Recipe) -> list[str]:
    """Combinations that each stage accepts alone but that cannot work together."""
    found = []
    prune, recover, export, bench, evaluation = (recipe.section(n) for n in SECTIONS)
    if not recipe.stages():
        found.append("the recipe runs no stage: give at least one of " + ", ".join(SECTIONS))
    if prune is not None and recover is not None:
        prune_pattern, recover_pattern = prune.get("pattern"), recover.get("pattern")
        if prune_pattern and recover_pattern != prune_pattern:
            found.append(f"prune.pattern {prune_pattern} needs recover.pattern {prune_pattern} too: recover would prune "
                         "unstructured on top and break the N:M pattern")
        prune_sparsity = prune.get("sparsity", PruneConfig.sparsity)
        recover_sparsity = recover.get("sparsity")
        if recover_sparsity is None:
            recover_sparsity = RECOVER_SPARSITY
        if not prune_pattern and not recover_pattern and not prune.get("per_layer") and recover_sparsity < prune_sparsity:
            found.append(f"recover.sparsity {recover_sparsity} is below prune.sparsity {prune_sparsity}: recover never "
                         "revives weights; raise recover.sparsity or lower prune.sparsity")
    if bench is not None:
        exported = export or {}
        for key, default in (("batch", BenchConfig.batch), ("seqlen", BenchConfig.seqlen)):
            fixed = exported.get(key)
            wanted = bench.get(key, default)
            if fixed is not None and fixed != wanted:
                found.append(f"export.{key} {fixed} fixes the ONNX graphs' {key}, but bench.{key} is {wanted}: make them equal "
                             f"or drop export.{key}")
        if not exported.get("decode", ExportConfig.decode) and bench.get("decode_tokens", BenchConfig.decode_tokens) > 0:
            found.append("bench.decode_tokens > 0 times the decode graph, but export.decode is false: "
                         "set export.decode true or bench.decode_tokens 0")
    if evaluation is not None and not evaluation.get("data"):
        found.append("eval.data is required: the text to measure perplexity on before and after (.txt/.jsonl, or wikitext2)")
    return found


def recipe_problems(recipe: Recipe) -> list[str]:
    """Every value problem of every stage, and the cross-stage ones (all of them, not the first)."""
    found = []
    for plan in plan_stages(recipe, "OUT"):
        if plan.name == "dense-export" and recipe.section("export") is not None:
            continue  # same settings as export: its problems are reported there
        config = replace(plan.config, sparsity=False) if plan.name == "eval" else plan.config
        try:
            config.validate()
        except ConfigError as exc:
            if plan.name == "eval" and "--data" in str(exc):
                message = "; ".join(p for p in str(exc).split("; ") if "--data" not in p)  # said below, in recipe terms
                if not message:
                    continue
                exc = ConfigError(message)
            found.append(_in_recipe_terms("export" if plan.name == "dense-export" else plan.name, str(exc)))
    return found + _cross_stage_problems(recipe)


def collect_recipe(path: str | None, overrides: list[str] = ()) -> tuple[Recipe, list[str]]:
    """Read (or take the built-in default), override, parse and check: the recipe and all problems."""
    raw = copy.deepcopy(DEFAULT_RECIPE) if path is None else read_recipe_file(path)
    problems = apply_overrides(raw, list(overrides))
    recipe, parse_problems = parse_recipe(raw)
    problems += parse_problems
    if recipe.device not in DEVICES:
        problems.append(f"device {recipe.device!r} is unknown; choose one of {', '.join(DEVICES)}")
    problems += recipe_problems(recipe)
    return recipe, list(dict.fromkeys(problems))


def load_recipe(path: str | None, overrides: list[str] = ()) -> Recipe:
    """The checked recipe, or one ConfigError listing every problem."""
    recipe, problems = collect_recipe(path, overrides)
    if problems:
        raise ConfigError(format_problems(problems, path))
    return recipe


def format_problems(problems: list[str], path: str | None) -> str:
    where = path or "the default recipe"
    count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
    return f"{where}: {count}, nothing was run: " + "; ".join(problems)


def dump_recipe(recipe: Recipe, header: str = "") -> str:
    """YAML text of a recipe (for ``recipe.yaml`` in the output folder)."""
    body = yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False)
    return header + body
