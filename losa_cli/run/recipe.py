"""Recipes of ``losa run``: one YAML file -> the raw settings of every stage, keys and types checked.

A recipe has top-level keys ``model``, ``seed``, ``device``, ``trust_remote_code`` and one
section per stage: ``prune``, ``recover``, ``export``, ``bench``, ``eval``.  A section that is
absent or ``null`` is not run.  A section's keys are the field names of that stage's config
(``prune.PruneConfig``, ...); the calibration fields ``calib``, ``nsamples``, ``seqlen``, ``sampling``,
``encoding`` are given flat in ``prune`` / ``recover``.  What ``losa run`` sets itself (inputs,
outputs, ``force``) is refused with the reason.  Overrides ``section.key=value``
(``recover.total_steps=40``, ``prune=null``, ``model=some/folder``) are applied on top, the value
read as YAML.  ``plan.py`` turns the parsed recipe into the stages' configs, once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import DEFAULT_MODEL, CalibrationConfig
from ..core.errors import ConfigError
from ..core.settings import (
    bounded,
    coerce,
    field_types,
    read_yaml_mapping,
    shown,
    split_override,
    type_name,
    typed_settings,
    unknown_key,
)
from ..export import ExportConfig
from ..prune import PruneConfig
from ..recover import RecoverConfig
from ..runtime import BenchConfig, EvalConfig

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
        "reconstruct": True,
        "reconstruct_target": "dense",
    },
    "export": {"onnx": True},
    "bench": {"engines": "onnxruntime,deepsparse,losa", "precisions": "fp32,bf16,int8", "seqlen": 128,
              "decode_tokens": 8, "iterations": 5, "warmup": 1, "data": "../shared/data/wiki-sample.txt",
              "data_windows": 8},
    "eval": {"data": "../shared/data/wiki-sample.txt", "seqlen": 512, "max_windows": 32},
}


@dataclass
class RunConfig:
    """Settings of ``losa run``: which recipe, the overrides, where to write, whether to start over."""

    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    out: str = DEFAULT_OUT
    restart: bool = False

    def __post_init__(self) -> None:
        found = []
        if not self.out:
            found.append("--out is required: the folder for the run's stages and report")
        if self.recipe is not None and not Path(self.recipe).is_file():
            what = "is not a file" if Path(self.recipe).exists() else "does not exist"
            found.append(f"recipe {self.recipe} {what}; give a YAML file (see examples/) or none for the default")
        if found:
            raise ConfigError(found)


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


def read_recipe_file(path: str) -> dict[str, Any]:
    """The recipe file as a mapping (an empty file is an empty recipe)."""
    return read_yaml_mapping(path, "recipe")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """Apply ``key=value`` / ``section.key=value`` overrides in place; return the problems."""
    problems = []
    for text in overrides:
        split = split_override(text)
        if isinstance(split, str):
            problems.append(split)
            continue
        name, value = split
        section, dot, setting = name.partition(".")
        if not dot:
            raw[name] = value
        elif section not in SECTIONS:
            problems.append(f"override {shown(text)}: {shown(section)} is not a stage section ({', '.join(SECTIONS)})")
        elif "." in setting or not setting:
            problems.append(f"override {shown(text)}: give section.key with one dot")
        else:
            current = raw.get(section)
            if not isinstance(current, dict):
                current = {}  # setting a key of an absent section turns that stage on
            raw[section] = {**current, setting: value}
    return problems


def section_keys(name: str) -> dict[str, Any]:
    """The keys a section accepts, with their types (calibration fields flat for prune/recover)."""
    allowed = {
        k: v
        for k, v in field_types(CONFIG_CLASSES[name]).items()
        if k not in _MANAGED_ALL and k not in _MANAGED.get(name, {}) and k != "calibration"
    }
    if name in ("prune", "recover"):
        calibration = field_types(CalibrationConfig)
        allowed.update({k: calibration[k] for k in CALIBRATION_KEYS})
    return allowed


def stage_config(name: str, section: dict[str, Any], seed: int = 0, **fixed: Any) -> Any:
    """A stage's config from a section's settings (calibration keys flat) and the fields set outside it;
    raises the config's own ``ConfigError`` when it has problems."""
    rest = {k: v for k, v in section.items() if k not in CALIBRATION_KEYS}
    if name in ("prune", "recover"):
        calibration = {k: v for k, v in section.items() if k in CALIBRATION_KEYS}
        rest["calibration"] = CalibrationConfig(**calibration, seed=seed)
    return CONFIG_CLASSES[name](**rest, **fixed)


def section_settings(name: str, settings_file: str | None, overrides: list[str], flags: list[str]) -> dict[str, Any]:
    """A stage's settings from a YAML file (the same keys as its recipe section) and ``key=value`` overrides on
    top, checked and typed as a recipe's (``losa recover --config FILE key=value``); keys in ``flags`` have
    command-line options of their own (and no recipe key)."""
    raw = read_yaml_mapping(settings_file, f"{name} settings file") if settings_file else {}
    problems: list[str] = []
    for text in overrides:
        split = split_override(text)
        if isinstance(split, str):
            problems.append(split)
        else:
            raw[split[0]] = split[1]
    managed = {flag: f"give --{flag.replace('_', '-')}" for flag in flags}
    parsed = typed_settings(raw, section_keys(name), name, managed, problems, place="in a file or override")
    if problems:
        raise ConfigError(bounded(problems))
    return parsed


def _parse_section(name: str, raw: Any, problems: list[str]) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(f"{name}: a stage section is a mapping of settings (or null to skip the stage), got "
                        f"{shown(raw)}")
        return None
    return typed_settings(raw, section_keys(name), name, {**_MANAGED_ALL, **_MANAGED.get(name, {})}, problems)


def parse_recipe(raw: dict[str, Any]) -> tuple[Recipe, list[str]]:
    """Check keys and types; bad entries are dropped and listed, so value checks can still run."""
    problems: list[str] = []
    recipe = Recipe()
    for name, value in raw.items():
        name = str(name)
        if name in SECTIONS:
            recipe.sections[name] = _parse_section(name, value, problems)
        elif name in TOP_LEVEL:
            ok, converted = coerce(value, TOP_LEVEL[name])
            if ok:
                setattr(recipe, name, converted)
            else:
                problems.append(f"{name} must be {type_name(TOP_LEVEL[name])}, got {shown(value)}")
        else:
            problems.append(unknown_key("recipe", name, [*TOP_LEVEL, *SECTIONS]))
    return recipe, problems
