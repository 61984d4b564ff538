"""LoSiA-style subnet fine-tuning (``--adapter losia``): only the localised sub-matrix moves,
pruned weights stay exactly zero, relocalisation follows the scores, resume stays exact."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_recover import base_weights, config
from torch import nn
from typer.testing import CliRunner

from conftest import StopRun, stop_after, synthetic_text
from losa_cli.cli import app
from losa_cli.core.modeling import block_linears, find_blocks, load_model
from losa_cli.recover import run_recover
from losa_cli.recover.subnet import SubnetLinear, step_subnets
from losa_cli.run.recipe import section_keys

runner = CliRunner()


@pytest.fixture(scope="module")
def plain_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft") / "train.txt"
    path.write_text(synthetic_text(60, 80, seed=9))
    return path


def sparse_subnet(ratio=0.25, period=100, seed=0) -> SubnetLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(16, 12)
    with torch.no_grad():
        linear.weight.masked_fill_(torch.rand_like(linear.weight) < 0.5, 0.0)
    return SubnetLinear(linear, ratio, period)


def train_step(layer: SubnetLinear, optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    x = torch.randn(4, 5, 16)
    (layer(x) * torch.linspace(-1, 1, 12)).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    step_subnets({"layer": layer}, optimizer)


def test_updates_change_only_the_localised_submatrix_and_keep_pruned_weights_zero():
    layer = sparse_subnet()
    layer.train()
    pruned = layer.base.weight == 0
    optimizer = torch.optim.AdamW(layer.trainable(), lr=1e-2, weight_decay=0.1)
    train_step(layer, optimizer, 0)  # the first step scores, then the subnet is localised
    rows, cols = layer.rows.clone(), layer.cols.clone()
    assert int(layer.countdown) == 100 and not layer.delta.any()
    assert not optimizer.state.get(layer.delta)  # the moments of the old sub-matrix are dropped
    before = layer.base.weight.detach().clone()
    for seed in range(1, 5):
        train_step(layer, optimizer, seed)
        assert layer.base.weight[pruned].eq(0).all() and layer.block_update()[~layer.sub_mask()].eq(0).all()
    x = torch.randn(3, 16)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged)  # the merged weight is the function trained
    after = layer.base.weight.detach()
    assert after[pruned].eq(0).all()  # exactly zero, not merely small
    inside = torch.zeros_like(pruned)
    inside[rows[:, None], cols] = True
    changed = after != before
    assert not changed[~inside].any()  # nothing outside the core sub-matrix moved
    assert changed[inside & ~pruned].all()  # every kept weight inside it did


def test_relocalisation_picks_the_rows_and_columns_with_the_largest_scores():
    layer = sparse_subnet(ratio=0.5, seed=3)
    layer.train()
    with torch.no_grad():
        layer.rows.copy_(torch.tensor([0, 3, 5, 7, 8, 11]))
        layer.delta.normal_()  # the scores must see the weight with the delta in place
    torch.manual_seed(1)
    x = torch.randn(2, 7, 16)
    weights = torch.linspace(-1, 2, 12)
    (layer(x) * weights).pow(2).sum().backward()
    # independently: the dense gradient of the effective weight, scores |G * W_eff|
    effective = layer.base.weight.detach().clone()
    effective[layer.rows[:, None], layer.cols] += (layer.delta * layer.sub_mask()).detach()
    effective.requires_grad_(True)
    (F.linear(x, effective, layer.base.bias) * weights).pow(2).sum().backward()
    scores = (effective.grad * effective.detach()).abs()
    expected_rows = set(scores.sum(1).topk(6).indices.tolist())
    expected_cols = set(scores.sum(0).topk(8).indices.tolist())
    layer.relocalize()
    assert set(layer.rows.tolist()) == expected_rows and set(layer.cols.tolist()) == expected_cols
    torch.testing.assert_close(layer.base.weight, effective.detach())  # the old delta folded in
    assert not layer.row_scores.any() and not layer.delta.any()


def test_losia_recover_keeps_every_pruned_weight_zero(tiny_llama_6, calib_file, plain_text, tmp_path, monkeypatch):
    """A short two-stage run with --adapter losia: the saved model's zeros contain the last
    pruning's zeros (recorded from outside), training moved the kept weights, the loss falls."""
    from losa_cli.recover import stages as workflow

    seen = []
    real_prune_blocks = workflow.prune_blocks

    def recording(model, *args, **kwargs):
        warnings = real_prune_blocks(model, *args, **kwargs)
        seen.append({n.removesuffix(".base"): lin.weight.detach().clone()  # the wrapped layers
                     for n, lin in block_linears(find_blocks(model)).items()})
        return warnings

    monkeypatch.setattr(workflow, "prune_blocks", recording)
    out = tmp_path / "losia"
    result = run_recover(config(tiny_llama_6, out, plain_text, calib_file, adapter="losia", losia_ratio=0.25,
                                losia_period=2, steps_per_stage=[4, 12], lr=2e-2))
    saved = load_model(str(out)).model
    moved = 0
    for name, linear in block_linears(find_blocks(saved)).items():
        pruned = seen[-1][name] == 0
        assert linear.weight[pruned].eq(0).all(), name
        moved += int((linear.weight != seen[-1][name]).sum())
    assert moved > 0
    assert result.global_sparsity >= 0.6 - 0.02
    losses = result.stages[-1].losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    manifest = json.loads((out / "losa_manifest.json").read_text())
    assert manifest["settings"]["adapter"] == "losia" and manifest["settings"]["losia_period"] == 2


def test_losia_resume_mid_stage_matches_an_uninterrupted_run(tiny_llama_6, calib_file, plain_text, tmp_path):
    """Stopped inside stage 2 with relocalisations on both sides of the checkpoint (period 2),
    the resumed run ends exactly where an uninterrupted one does."""
    settings = dict(adapter="losia", losia_ratio=0.25, losia_period=2, reset_optimizer=False)
    straight = run_recover(config(tiny_llama_6, tmp_path / "a", plain_text, calib_file, **settings))
    with pytest.raises(StopRun):
        run_recover(config(tiny_llama_6, tmp_path / "b", plain_text, calib_file, **settings), stop_after(10))
    resumed = run_recover(config(tiny_llama_6, tmp_path / "b", plain_text, calib_file, resume=True, **settings))
    assert resumed.resumed_from == {"stage": 2, "step": 3}
    for ours, reference in zip(resumed.stages, straight.stages):
        assert ours.losses == pytest.approx(reference.losses, rel=1e-5)
    a, b = base_weights(tmp_path / "a"), base_weights(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra,message", [
    (["--adapter", "lora"], "--adapter 'lora' is unknown; choose one of masked-lora, losia"),
    (["--adapter", "losia", "losia_ratio=0"], "losia_ratio must be in (0, 1]"),
    (["--adapter", "losia", "losia_period=0"], "losia_period must be at least 1"),
])
def test_bad_adapter_settings_get_one_line(tiny_llama_6, calib_file, plain_text, tmp_path, extra, message):
    result = runner.invoke(app, ["recover", "--model", str(tiny_llama_6), "--out", str(tmp_path / "o"), "--data",
                                 str(plain_text), "--calib", str(calib_file), *extra])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output, result.stderr
    assert {"adapter", "losia_ratio", "losia_period"} <= set(section_keys("recover"))  # recipes take them too


def test_unmerge_with_a_new_mask_rereads_it_and_relocalises_after_the_next_step():
    """As at a stage start: merge, prune a weight inside the core sub-matrix, unmerge(new_mask=True)."""
    layer = sparse_subnet()
    layer.train()
    optimizer = torch.optim.AdamW(layer.trainable(), lr=1e-2)
    for seed in range(3):
        train_step(layer, optimizer, seed)
    with torch.no_grad():
        layer.delta.normal_()  # a trained delta to take back out
    layer.merge()
    kept = (layer.base.weight != 0).nonzero()
    rows, cols = layer.rows.tolist(), layer.cols.tolist()
    row, col = next((int(r), int(c)) for r, c in kept if int(r) in rows and int(c) in cols)
    with torch.no_grad():
        layer.base.weight[row, col] = 0.0  # "pruning"
    x = torch.randn(3, 16)
    merged = layer(x)
    layer.unmerge(new_mask=True)
    assert not layer.mask[row, col] and int(layer.countdown) == 1
    torch.testing.assert_close(layer(x), merged)  # same function, the pruned weight out of the update
    train_step(layer, optimizer, 7)
    layer.merge()
    assert layer.base.weight[row, col] == 0 and int(layer.countdown) == 100  # relocalised after that step
