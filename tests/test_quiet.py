"""Quiet by default: a ``losa`` process whose stderr is not a terminal (a CI log, ``nohup``) writes
only losa's own lines there -- plain progress and ``warning:`` lines -- and no library's tqdm bars,
log messages or Python warnings; ``--verbose`` / ``LOSA_VERBOSE=1`` lets them through
(core/quiet.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import build_tiny_gguf, build_tiny_model, synthetic_text
from losa_cli.cli import application as cli
from losa_cli.core.quiet import QUIET_ENVIRONMENT

REPO = Path(__file__).resolve().parents[1]
#: two commands in one fresh process (one start-up of torch and transformers instead of two), and a
#: Python warning raised between them as a library would, after losa's start-up
TWO_COMMANDS = """
import sys, warnings
from losa_cli.cli import app
first, second = sys.argv[1].split(), sys.argv[2].split()
app(first, standalone_mode=False)
warnings.warn("a library's deprecation notice", FutureWarning)
app(second, standalone_mode=False)
"""
LOSA_LINE = re.compile(r"^(perplexity \d+/\d+|warning: .*)$")  # the progress of these two evals, and losa's warnings


@pytest.fixture(scope="module")
def noisy_inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny GGUF (transformers draws a bare tqdm bar de-quantizing it), a model folder whose
    generation config sets sampling flags without sampling (transformers logs a warning), and text.
    (A tensor the architecture lacks, transformers' LOAD REPORT, is an error in losa: test_bad_input.)"""
    root = tmp_path_factory.mktemp("quiet")
    gguf = build_tiny_gguf(root / "tiny.gguf")
    folder = build_tiny_model(root / "extra", "llama")
    (folder / "generation_config.json").write_text('{"do_sample": false, "temperature": 0.5, "top_p": 0.9}')
    text = root / "text.txt"
    text.write_text(synthetic_text(20, 40, seed=3))
    return gguf, folder, text


def run_losa(global_options: list[str], inputs: tuple[Path, Path, Path]) -> str:
    """stderr of a fresh process running ``losa eval`` on the GGUF, then on the folder; stderr is a pipe."""
    gguf, folder, text = inputs
    evaluate = f"--seqlen 16 --max-windows 2 --data {text} --model"
    commands = [" ".join([*global_options, "eval", evaluate, str(model)]) for model in (gguf, folder)]
    env = {
        k: v for k, v in os.environ.items() if k not in QUIET_ENVIRONMENT and k != "LOSA_VERBOSE"
    }  # nothing inherited
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", TWO_COMMANDS, *commands], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_stderr_holds_only_losas_lines_unless_verbose(noisy_inputs):
    quiet = run_losa([], noisy_inputs)
    lines = [line for line in re.split(r"[\r\n]+", quiet) if line.strip()]
    assert lines and all(LOSA_LINE.match(line) for line in lines), quiet
    verbose = run_losa(["--verbose"], noisy_inputs)
    assert "Converting and de-quantizing GGUF tensors" in verbose and "it/s" in verbose  # transformers' tqdm bar
    assert "generation flags are not valid" in verbose  # transformers' log warning
    assert "FutureWarning: a library's deprecation notice" in verbose  # a Python warning
    assert [line for line in verbose.splitlines() if LOSA_LINE.match(line)] == lines  # losa's own lines either way


@pytest.mark.parametrize("switch", ["--verbose", "LOSA_VERBOSE=1", None])
def test_verbose_switch_reaches_the_policy(switch, monkeypatch, tmp_path):
    asked: list[bool] = []
    monkeypatch.setattr(cli, "quiet_third_party", asked.append)
    monkeypatch.delenv("LOSA_VERBOSE", raising=False)
    options = [switch] if switch == "--verbose" else []
    env = {"LOSA_VERBOSE": "1"} if switch == "LOSA_VERBOSE=1" else {}
    result = CliRunner().invoke(cli.app, [*options, "eval", "--model", str(tmp_path / "none")], env=env)
    assert result.exit_code != 0 and asked == [switch is not None]


TORCH_LOG = """
import logging, sys
from losa_cli.core.quiet import quiet_third_party
quiet_third_party(sys.argv[1] == "verbose")
import torch  # after losa's start-up, as the commands import it
logging.getLogger("torch.utils.cpp_extension").warning("a torch log warning")
"""


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_torch_log_warnings_stay_quiet(verbose):
    """torch configures its own loggers when imported (after losa set theirs), so without ``TORCH_LOGS`` its
    warnings -- the extension builder's compiler notice of ``--kernel`` / ``--engines losa`` -- reached stderr."""
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENVIRONMENT and k != "LOSA_VERBOSE"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", TORCH_LOG, "verbose" if verbose else "quiet"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("a torch log warning" in done.stderr) == verbose, done.stderr
