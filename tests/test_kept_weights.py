"""``--adapter kept-weights``: every kept weight trained in place, the mask enforced in the forward,
the gradient and the saved model; resumable exactly."""

import pytest
import torch
import torch.nn.functional as F
from test_recover import assert_resumed_like_straight, config
from torch import nn

from conftest import StopRun, stop_after
from losa_cli.core.modeling import block_linears, find_blocks, load_model
from losa_cli.recover import run_recover
from losa_cli.recover.kept_weights import KeptWeightsLinear


def sparse_wrapper(seed: int = 0) -> KeptWeightsLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(16, 12)
    with torch.no_grad():
        linear.weight.masked_fill_(torch.rand_like(linear.weight) < 0.5, 0.0)
    return KeptWeightsLinear(linear)


def test_gradient_is_the_masked_formula_and_the_output_the_masked_layer():
    wrapper = sparse_wrapper()
    torch.manual_seed(3)
    x, g = torch.randn(2, 7, 16, requires_grad=True), torch.randn(2, 7, 12)
    out = wrapper(x)
    out.backward(g)
    weight, mask = wrapper.base.weight.detach(), wrapper.mask
    torch.testing.assert_close(out, F.linear(x, weight * mask, wrapper.base.bias))
    flat_g, flat_x = g.reshape(-1, 12), x.detach().reshape(-1, 16)
    torch.testing.assert_close(wrapper.base.weight.grad, (flat_g.T @ flat_x) * mask)
    torch.testing.assert_close(wrapper.base.bias.grad, flat_g.sum(0))
    torch.testing.assert_close(x.grad, g @ (weight * mask))
    assert wrapper.base.weight.grad[~mask].eq(0).all() and not torch.allclose(
        wrapper.base.weight.grad, flat_g.T @ flat_x)  # the mask matters


def test_a_weight_pruned_between_stages_stays_zero_under_stale_adam_moments():
    """AdamW's moments from before a stage's pruning would move a newly pruned weight; the effective
    weight (and, after merge, the stored one) stays exactly zero."""
    wrapper = sparse_wrapper()
    optimizer = torch.optim.AdamW(wrapper.trainable(), lr=1e-2)
    x = torch.randn(5, 16)
    for _ in range(3):
        wrapper(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    wrapper.merge()
    with torch.no_grad():
        wrapper.base.weight[:, :3] = 0.0  # this stage's pruning, while merged
    wrapper.unmerge(new_mask=True)
    assert not wrapper.mask[:, :3].any()
    wrapper(x).pow(2).sum().backward()
    optimizer.step()  # the moments were kept: the raw weights of the new zeros move ...
    assert wrapper.base.weight[:, :3].ne(0).any()
    masked = wrapper.base.weight.detach() * wrapper.mask
    torch.testing.assert_close(wrapper(x), F.linear(x, masked, wrapper.base.bias))  # ... the layer does not use them
    wrapper.merge()
    assert wrapper.base.weight[:, :3].eq(0).all() and wrapper.base.weight[~wrapper.mask].eq(0).all()


def test_merge_refuses_nan():
    wrapper = sparse_wrapper()
    with torch.no_grad():
        wrapper.base.weight[wrapper.mask.nonzero()[0].tolist()] = float("nan")
    with pytest.raises(FloatingPointError):
        wrapper.merge()


def test_kept_weights_recover_trains_every_kept_weight_and_revives_none(
    tiny_llama_6, calib_file, plain_text, tmp_path, monkeypatch
):
    """A two-stage run: the saved zeros contain the last pruning's zeros (recorded from outside),
    most kept weights moved, the loss falls."""
    from losa_cli.recover import stages

    seen = []
    real_prune_blocks = stages.prune_blocks

    def recording(model, *args, **kwargs):
        warnings = real_prune_blocks(model, *args, **kwargs)
        seen.append({n.removesuffix(".base"): lin.weight.detach().clone()
                     for n, lin in block_linears(find_blocks(model)).items()})
        return warnings

    monkeypatch.setattr(stages, "prune_blocks", recording)
    out = tmp_path / "kept"
    result = run_recover(config(tiny_llama_6, out, plain_text, calib_file, adapter="kept-weights",
                                steps_per_stage=[4, 12], lr=2e-3))
    saved = load_model(str(out)).model
    kept = moved = 0
    for name, linear in block_linears(find_blocks(saved)).items():
        pruned = seen[-1][name] == 0
        assert linear.weight[pruned].eq(0).all(), name
        kept += int((~pruned).sum())
        moved += int((linear.weight != seen[-1][name])[~pruned].sum())
    assert moved > 0.9 * kept
    losses = result.stages[-1].losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_kept_weights_resume_mid_stage_matches_an_uninterrupted_run(tiny_llama_6, calib_file, plain_text, tmp_path):
    settings = dict(adapter="kept-weights", reset_optimizer=False, lr=2e-3)
    straight = run_recover(config(tiny_llama_6, tmp_path / "a", plain_text, calib_file, **settings))
    with pytest.raises(StopRun):
        run_recover(config(tiny_llama_6, tmp_path / "b", plain_text, calib_file, **settings), stop_after(10))
    resumed = run_recover(config(tiny_llama_6, tmp_path / "b", plain_text, calib_file, resume=True, **settings))
    assert resumed.resumed_from == {"stage": 2, "step": 3}
    assert_resumed_like_straight(resumed, straight, tmp_path / "b", tmp_path / "a")
