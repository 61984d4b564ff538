"""A full disk or a file-size limit while writing weights, graphs or activations: one ``error:`` line, a
non-zero exit and nothing half-written (``core/atomic.py``); it was a traceback.

The limit is real (``RLIMIT_FSIZE`` in a child process: Python ignores SIGXFSZ, so the write fails with
EFBIG) where the writer is a library (safetensors in Rust, the ONNX exporter); a full disk is simulated by
making the activation writer raise ``ENOSPC``."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from conftest import build_tiny_model, folder_digest, synthetic_text
from losa_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
LIMITED = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from losa_cli.cli import app
app(sys.argv[2:], prog_name="losa")
"""


def limited(limit: int, *args: str) -> subprocess.CompletedProcess:
    """``losa ARGS`` in a child whose files may not grow past ``limit`` bytes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit), *args], env=env, capture_output=True,
                          text=True, timeout=600)


def assert_one_line_nothing_left(done, out: Path, model: Path, before: str) -> None:
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "File too large" in lines[0] or "No space left" in lines[0], lines[0]
    assert not out.exists() and [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []
    assert folder_digest(model) == before


def test_weights_over_a_file_size_limit(tmp_path):
    model = build_tiny_model(tmp_path / "model", "llama")  # its weights: ~160 kB
    calib = tmp_path / "calib.txt"
    calib.write_text(synthetic_text(60, 60, seed=1))
    before = folder_digest(model)
    out = tmp_path / "out" / "pruned"
    done = limited(40_000, "prune", "--model", str(model), "--out", str(out), "--calib", str(calib),
                   "--nsamples", "2", "--seqlen", "16")
    assert_one_line_nothing_left(done, out, model, before)
    graphs = tmp_path / "out" / "graphs"  # graphs only: the ONNX exporter's external weights (~160 kB) fail
    done = limited(120_000, "export", str(model), "--out", str(graphs), "--onnx", "--no-safetensors")
    assert_one_line_nothing_left(done, graphs, model, before)


def test_activations_on_a_full_disk(tmp_path, monkeypatch):
    """``--activations-on-disk``: the hidden states go to a temporary folder beside the output."""
    import safetensors.torch

    model = build_tiny_model(tmp_path / "model", "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(synthetic_text(60, 60, seed=1))
    before = folder_digest(model)
    written = safetensors.torch.save_file

    def full_disk(tensors, path, *args, **kwargs):
        if "activations" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return written(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "out" / "pruned"
    result = CliRunner().invoke(app, ["prune", "--model", str(model), "--out", str(out), "--calib", str(calib),
                                      "--nsamples", "2", "--seqlen", "16", "--activations-on-disk"])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1 and "No space left on device" in lines[0], result.output
    assert not out.exists() and list(out.parent.iterdir()) == []  # no staging folder, no activations left
    assert folder_digest(model) == before
