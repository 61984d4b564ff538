"""RMI / OWL allocation: the exact optimum, CKA properties, and `losa prune --allocation` end to end."""

import json
import math

import pytest
import torch
from scipy.optimize import linprog
from typer.testing import CliRunner

from losa_cli.cli import app
from losa_cli.prune.rmi import (
    allocate_exact,
    center,
    default_delta,
    gram_matrix,
    importance,
    outlier_ratio,
    owl_rates,
    rmi_rates,
    similarity_matrix,
)

runner = CliRunner()


@pytest.mark.parametrize(
    "count,target,delta,seed", [(5, 0.5, 0.01, 0), (8, 0.7, 0.03, 1), (7, 0.6, 0.02, 2), (30, 0.55, 0.05, 3)]
)
def test_allocation_matches_linear_program(count, target, delta, seed):
    torch.manual_seed(seed)
    scores = torch.rand(count)
    rates = allocate_exact(scores, target, target - delta, target + delta)
    lp = linprog(
        c=scores.double().numpy(),
        A_eq=[[1.0] * count],
        b_eq=[target * count],
        bounds=[(target - delta, target + delta)] * count,
        method="highs",
    )
    assert lp.success
    ours = float(sum(r * float(s) for r, s in zip(rates, scores)))
    assert ours == pytest.approx(lp.fun, abs=1e-9)
    assert sum(rates) / count == pytest.approx(target, abs=1e-12)
    assert all(target - delta - 1e-12 <= r <= target + delta + 1e-12 for r in rates)
    # the less important half gets s + delta, the more important half s - delta
    order = torch.argsort(scores).tolist()
    assert all(rates[i] == pytest.approx(target + delta) for i in order[: count // 2])
    assert all(rates[i] == pytest.approx(target - delta) for i in order[count - count // 2 :])


def test_allocation_asymmetric_bounds_still_exact():
    scores = torch.tensor([0.3, 0.1, 0.9, 0.5])
    rates = allocate_exact(scores, 0.05, 0.0, 0.1)  # target near zero: lower bound clipped at 0
    assert sum(rates) / 4 == pytest.approx(0.05)
    assert rates == pytest.approx([0.1, 0.1, 0.0, 0.0])


def _reps(seed, n=6, t=5, d=7):
    torch.manual_seed(seed)
    return [torch.randn(1, t, d) for _ in range(n)]


def test_gram_in_chunks_equals_direct():
    reps = _reps(0)
    flat = torch.stack([r.reshape(-1) for r in reps]).double()
    torch.testing.assert_close(gram_matrix(reps, chunk=4), flat @ flat.T)


def test_center_is_hkh():
    k = gram_matrix(_reps(1))
    h = torch.eye(6, dtype=torch.float64) - 1.0 / 6
    torch.testing.assert_close(center(k), h @ k @ h)


def test_cka_symmetric_unit_diagonal_and_invariant():
    a, b, c = _reps(2), _reps(3), _reps(4)
    q, _ = torch.linalg.qr(torch.randn(7, 7))
    rotated_scaled = [3.7 * (x @ q) for x in a]  # orthogonal transform + isotropic scaling of each token
    sim = similarity_matrix([gram_matrix(r) for r in (a, b, c, rotated_scaled)])
    torch.testing.assert_close(sim, sim.T)
    torch.testing.assert_close(sim.diagonal(), torch.ones(4, dtype=torch.float64))
    assert sim[0, 3] == pytest.approx(1.0, abs=1e-9)
    assert sim[0, 1] < 0.999


def test_importance_and_rmi_rates_follow_redundancy():
    sim = torch.tensor(
        [[1.0, 0.9, 0.9, 0.1], [0.9, 1.0, 0.9, 0.1], [0.9, 0.9, 1.0, 0.2], [0.1, 0.1, 0.2, 1.0]], dtype=torch.float64
    )
    weights = importance(sim, beta=1.0)
    assert int(torch.argmax(weights)) == 3  # the odd one out is the most important
    rates, _ = rmi_rates(sim, 0.5, 0.01, beta=1.0)
    assert rates[3] == pytest.approx(0.49) and sum(rates) / 4 == pytest.approx(0.5)


def test_default_delta_bands():
    assert [default_delta(s) for s in (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)] == pytest.approx(
        [0.01, 0.01, 0.02, 0.03, 0.04, 0.05]
    )
    assert default_delta(0.95) == pytest.approx(0.025)


def _published_owl(ratios, sparsity, lam):
    """OWL's rule as its paper's code writes it, independently of rmi.py: ratios rescaled onto
    [0, 2 lam], density = rescaled - mean + (1 - sparsity), rate = 1 - density."""
    low, high = min(ratios), max(ratios)
    rescaled = [(r - low) * (1 / (high - low)) * lam * 2 for r in ratios]
    mean = sum(rescaled) / len(rescaled)
    return [1 - (v - mean + (1 - sparsity)) for v in rescaled]


def test_owl_outlier_ratio_and_rates():
    scores = [torch.tensor([1.0] * 98 + [100.0, 100.0])]
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.02)
    # one outlier block among five: by hand 0.7 - 0.16 + 0.16 / 5 = 0.572, the others 0.7 + 0.032
    rates = owl_rates([0.01, 0.01, 0.01, 0.01, 0.09], 0.7, 0.08)
    assert rates == pytest.approx([0.732] * 4 + [0.572], abs=1e-12)
    for ratios in (
        [0.01, 0.01, 0.01, 0.01, 0.09],
        [0.01, 0.05, 0.02, 0.08, 0.03],
        [0.3] + [0.1 * i for i in range(29)],
    ):
        rates = owl_rates(ratios, 0.7, 0.08)
        assert rates == pytest.approx(_published_owl(ratios, 0.7, 0.08), abs=1e-12)
        assert abs(sum(rates) / len(rates) - 0.7) < 1e-15  # the mean is kept exactly
        assert max(rates) - min(rates) == pytest.approx(0.16, abs=1e-12)  # the span is 2 lambda
    rates = owl_rates([0.01, 0.05, 0.02, 0.08, 0.03], 0.7, 0.08)
    assert int(torch.tensor(rates).argmin()) == 3 and int(torch.tensor(rates).argmax()) == 0  # outliers keep weights
    assert owl_rates([0.02] * 4, 0.6, 0.08) == [0.6] * 4


def test_owl_rates_scale_down_only_below_zero():
    """Recover's first stages ask for targets below 2 lambda: deviations shrink so none is negative."""
    ratios = [0.01, 0.01, 0.01, 0.01, 0.09]
    rates = owl_rates(ratios, 0.1, 0.08)
    assert min(rates) == pytest.approx(0.0, abs=1e-15) and min(rates) >= 0.0
    assert sum(rates) / 5 == pytest.approx(0.1, abs=1e-15) and int(torch.tensor(rates).argmin()) == 4


def _prune(model, out, calib, *extra):
    return runner.invoke(
        app,
        [
            "prune",
            "--model",
            str(model),
            "--out",
            str(out),
            "--calib",
            str(calib),
            "--nsamples",
            "8",
            "--seqlen",
            "32",
            "--json",
            *extra,
        ],
    )


@pytest.mark.parametrize("allocation", ["rmi", "owl"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_with_allocation_end_to_end(tiny_llama_6, calib_file, tmp_path, allocation, method):
    out = tmp_path / "out"
    result = _prune(
        tiny_llama_6,
        out,
        calib_file,
        "--method",
        method,
        "--sparsity",
        "0.6",
        "--allocation",
        allocation,
        "--rmi-samples",
        "8",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rates = report["per_block_rates"]
    assert len(set(round(r, 9) for r in rates)) > 1, rates
    assert sum(rates) / len(rates) == pytest.approx(0.6, abs=1e-9)
    # global zeros equal --sparsity to within one weight per row
    rows = 6 * (32 + 16 + 16 + 32 + 64 + 64 + 32)
    assert abs(report["global_sparsity"] - 0.6) <= rows / (6 * (4 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)) + 1e-9
    manifest = json.loads((out / "losa_manifest.json").read_text())
    assert manifest["results"]["per_block_rates"] == rates
    assert manifest["settings"]["allocation"] == allocation
    if allocation == "rmi":
        sim = manifest["results"]["allocation"]["similarity"]
        assert len(sim) == 6 and all(math.isclose(sim[i][i], 1.0, abs_tol=1e-9) for i in range(6))
        assert manifest["results"]["allocation"]["settings"]["delta"] == 0.02
    else:
        assert len(manifest["results"]["allocation"]["outlier_ratios"]) == 6

    png = tmp_path / "alloc.png"
    shown = runner.invoke(app, ["inspect", str(out), "--plot", str(png), "--json"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.stdout)
    assert info["per_block_rates"] == rates and info["allocation"] == allocation
    assert info["lineage"][0]["command"] == "prune"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    from matplotlib.image import imread

    assert imread(str(png)).shape[0] > 100


def test_inspect_on_unpruned_model_and_plot_exists(tiny_models, tmp_path):
    result = runner.invoke(app, ["inspect", str(tiny_models["opt"]), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["global_sparsity"] == 0.0 and info["per_block_rates"] is None and info["lineage"] == []
    png = tmp_path / "p.png"
    png.write_bytes(b"x")
    again = runner.invoke(app, ["inspect", str(tiny_models["opt"]), "--plot", str(png)])
    assert again.exit_code == 2 and "pass --force" in again.stderr


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--pattern", "2:4", "--allocation", "rmi"], "cannot be combined"),
        (["--allocation", "best"], "--allocation 'best' is unknown"),
        (["--allocation", "rmi", "--delta", "0.6"], "--delta must be in (0, 0.5)"),
        (["--allocation", "owl", "--sparsity", "0.95"], "--owl-lambda must be positive with"),
        (["--allocation", "owl", "--sparsity", "0.9"], "--owl-lambda must be positive with"),  # 0.9 + 2 x 0.08 >= 1
        (["--allocation", "owl", "--sparsity", "0.1"], "--owl-lambda must be positive with"),  # a rate would be < 0
    ],
)
def test_allocation_bad_input(tiny_llama_6, calib_file, tmp_path, extra, message):
    result = _prune(tiny_llama_6, tmp_path / "out", calib_file, *extra)
    assert result.exit_code == 2 and message in result.stderr, result.stderr
