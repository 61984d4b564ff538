"""The house plan (../shared/docs/architecture.md), held by the code: imports run one way, stages meet only
at each other's public face, math modules import only torch, files stay small, and the linter is clean.

Imports are read from the source (``ast``), function-level ones included, so a lazy import cannot
slip past; each test names the offending file and line.
"""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "losa_cli"
#: which sub-packages each may import (core is shared by all; cli composes everything)
ALLOWED = {
    "core": set(),
    "prune": {"core"},
    "recover": {"core", "prune"},
    "runtime": {"core"},
    "export": {"core", "runtime"},
    "run": {"core", "prune", "recover", "export", "runtime"},
    "cli": {"core", "prune", "recover", "export", "runtime", "run"},
}
#: stage packages other packages may reach only through their ``__init__`` (their public face)
FACED = {"prune", "recover", "export", "runtime", "run"}
#: pure math: torch, numpy and the standard library only (and each other)
MATH_MODULES = ("prune/masks.py", "prune/wanda.py", "prune/sparsegpt.py", "prune/rmi.py", "prune/reconstruct.py",
                "recover/rank_alloc.py", "recover/schedule.py", "recover/losses.py")
THIRD_PARTY_MATH = {"torch", "numpy"}
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path``; relative imports resolved against its package."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    if path.name == "__init__.py":
        package = path.relative_to(PACKAGE.parent).parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if node.module is None:  # from . import a, b: each name is a module
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return found


def _package_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0]


def _violations(path: Path) -> list[str]:
    """Why each import of ``path`` runs against the plan."""
    own = _package_of(path)
    found = []
    for line, module in _imports(path):
        parts = module.split(".")
        if parts[0] != "losa_cli" or len(parts) < 2 or parts[1] == own:
            continue
        target = parts[1]
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        if target not in ALLOWED.get(own, set()):
            found.append(f"{where}: {own} may not import {target}")
        elif target in FACED and len(parts) > 2:
            found.append(f"{where}: import it from losa_cli.{target} (its public face)")
    return found


def test_imports_run_one_way_and_through_public_faces():
    problems = [problem for path in _modules() if path.parent != PACKAGE for problem in _violations(path)]
    assert not problems, "\n".join(problems)


def test_the_contract_catches_an_upward_import(tmp_path):
    """The check itself fails on code that imports against the plan (so a passing run means something)."""
    fake = PACKAGE / "runtime" / "_contract_probe.py"
    try:
        fake.write_text("from ..export.onnx_graphs import export_graphs\nfrom ..prune import run_prune\n")
        problems = _violations(fake)
    finally:
        fake.unlink()
    assert any("runtime may not import export" in p for p in problems)
    assert any("runtime may not import prune" in p for p in problems)
    fake = PACKAGE / "recover" / "_contract_probe.py"
    try:
        fake.write_text("def f():\n    from ..prune.pruning import prune_blocks\n")
        problems = _violations(fake)
    finally:
        fake.unlink()
    assert problems and "public face" in problems[0]


@pytest.mark.parametrize("relative", MATH_MODULES)
def test_math_modules_import_only_torch_numpy_and_each_other(relative):
    path = PACKAGE / relative
    allowed_local = {f"losa_cli.{m.removesuffix('.py').replace('/', '.')}" for m in MATH_MODULES}
    bad = []
    for line, module in _imports(path):
        top = module.split(".")[0]
        if module.startswith("losa_cli"):
            if module not in allowed_local:
                bad.append(f"{relative}:{line} {module}")
        elif top not in THIRD_PARTY_MATH and top not in sys.stdlib_module_names and top != "__future__":
            bad.append(f"{relative}:{line} {module}")
    assert not bad, f"math modules import torch/numpy only: {bad}"


def test_only_the_cli_imports_typer_and_rich():
    bad = [f"{path.relative_to(PACKAGE)}:{line} {module}" for path in _modules() if _package_of(path) != "cli"
           for line, module in _imports(path) if module.split(".")[0] in ("typer", "rich")]
    assert not bad, bad


def test_no_file_over_400_lines():
    lengths = {str(path.relative_to(PACKAGE)): len(path.read_text().splitlines()) for path in _modules()}
    long = {name: count for name, count in lengths.items() if count > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them where the seam is): {long}"


@pytest.mark.parametrize("package", sorted(FACED))
def test_every_public_name_resolves(package):
    module = importlib.import_module(f"losa_cli.{package}")
    assert module.__all__, f"losa_cli.{package} names no public face"
    for name in module.__all__:
        assert getattr(module, name) is not None


def test_the_configured_linter_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    root = PACKAGE.parent
    done = subprocess.run([ruff, "check", "losa_cli", "tests", "benchmarks"], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_the_command_line_starts_without_torch():
    """Config modules stay light: ``losa --help`` does not wait for torch, and the quiet switch
    (core/quiet.py) runs before any library that draws progress bars is imported."""
    code = "import sys, losa_cli.cli; print(sorted(m for m in ('torch', 'transformers', 'tqdm') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent, check=True)
    assert done.stdout.strip() == "[]", done.stdout
