"""Block-wise reconstruction (``--reconstruct``): the math on tensors, the fit inside the sequential pass on
tiny models (zeros kept, the block MSE against the dense block lowered), streamed = in memory bit for bit,
and recover with reconstruction resuming exactly."""

from __future__ import annotations

import json

import pytest
import torch
from test_low_memory import _tensors
from torch import nn
from typer.testing import CliRunner

from conftest import StopRun, stop_after
from losa_cli.cli import app
from losa_cli.core.config import CalibrationConfig
from losa_cli.core.modeling import find_blocks, find_linears, load_model
from losa_cli.core.sequential import sequential_blocks
from losa_cli.prune import PruneConfig, run_prune
from losa_cli.prune.pruning import Criterion, prune_blocks
from losa_cli.prune.reconstruct import MaskedAdam, block_mse, tunable_parameters
from losa_cli.prune.reconstruction import Reconstruction, Reconstructor, window_order

CPU = torch.device("cpu")


def settings(**changes) -> Reconstruction:
    base = dict(steps=40, lr=3e-3, params="weights", batch=4, split=False, inputs="sparse", seed=0)
    return Reconstruction(**{**base, **changes})


def windows(count: int = 8, length: int = 32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(3, 300, (count, length))


def first_block_error(model_dir, windows_: torch.Tensor, reconstruct: Reconstruction | None) -> dict:
    """Prune the tiny model at 60% (fitting each block when asked); return block 0's weights and the mean
    squared error of its output against the dense block 0 on the calibration windows (block 0 sees the
    same inputs in both runs, so the errors compare)."""
    dense = load_model(str(model_dir)).model
    step = next(sequential_blocks(dense, windows_, CPU))
    dense_out, inputs = step.run(), list(step.inputs)
    model = load_model(str(model_dir)).model
    reconstructor = Reconstructor(reconstruct) if reconstruct is not None else None
    prune_blocks(model, Criterion("wanda"), [0.6, 0.6], windows_, CPU, reconstructor=reconstructor)
    block = find_blocks(model)[0]
    probe = next(sequential_blocks(model, windows_, CPU))
    sparse_out = probe.run(inputs)
    error = float(sum(block_mse(a, b) for a, b in zip(sparse_out, dense_out)) / len(inputs))
    return {"error": error, "weights": {n: lin.weight.detach().clone() for n, lin in find_linears(block).items()},
            "fits": reconstructor.fits if reconstructor else None}


def test_masked_adam_keeps_pruned_weights_exactly_zero():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight.masked_fill_(torch.rand(8, 16) < 0.6, 0.0)
    pruned = layer.weight.detach() == 0
    chosen = tunable_parameters(layer, "weights")
    assert [p is layer.weight for p, _ in chosen] == [True, False] and chosen[1][0] is layer.bias
    tuner = MaskedAdam(chosen, lr=0.1)
    target = torch.randn(32, 8)
    x = torch.randn(32, 16)
    losses = [tuner.step(block_mse(layer(x), target)) for _ in range(20)]
    assert (layer.weight[pruned] == 0).all(), "a pruned weight came back"
    assert (layer.weight[~pruned] != 0).all() and losses[-1] < losses[0]


def test_norms_choose_only_norms_and_biases():
    block = nn.ModuleDict({"q": nn.Linear(4, 4, bias=True), "norm": nn.LayerNorm(4), "up": nn.Linear(4, 4, bias=False)})
    chosen = tunable_parameters(block, "norms")
    names = {id(p): n for n, p in block.named_parameters()}
    assert sorted(names[id(p)] for p, _ in chosen) == ["norm.bias", "norm.weight", "q.bias"]
    assert all(keep is None for _, keep in chosen)
    with pytest.raises(ValueError):
        tunable_parameters(block, "everything")


def test_window_order_covers_every_window_each_epoch():
    order = window_order(5, 12, seed=3)
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    assert order == window_order(5, 12, seed=3) and order != window_order(5, 12, seed=4)


@pytest.mark.parametrize("variant", [{}, {"split": True}, {"inputs": "dense"}, {"params": "norms"}])
def test_reconstruction_lowers_the_block_error_and_never_revives(tiny_models, variant):
    """Fails if the mask is dropped (pruned weights come back) or if the targets are the pruned block's
    own outputs instead of the dense block's (then nothing moves towards the dense block)."""
    model_dir, data = tiny_models["llama"], windows()
    plain = first_block_error(model_dir, data, None)
    fitted = first_block_error(model_dir, data, settings(**variant))
    for name, weight in fitted["weights"].items():
        assert torch.equal(weight == 0, plain["weights"][name] == 0), f"{name}: the mask changed"
        if variant.get("params") == "norms":
            assert torch.equal(weight, plain["weights"][name]), f"{name}: norms-only tuning moved a weight"
    # norms and biases are few parameters: on this random tiny model they take a few percent off, weights far more
    assert fitted["error"] < (0.98 if variant.get("params") == "norms" else 0.8) * plain["error"], (
        fitted["error"], plain["error"])
    assert all(f.last_loss < f.first_loss for f in fitted["fits"])
    if variant.get("split"):
        assert all(f.attention_last_loss < f.attention_first_loss for f in fitted["fits"])


def _prune(model, out, calib, **extra):
    config = PruneConfig(model=str(model), out=str(out), force=True, sparsity=0.6, reconstruct=True,
                         reconstruct_steps=6, reconstruct_batch=2, reconstruct_lr=1e-3,
                         calibration=CalibrationConfig(calib=str(calib), nsamples=4, seqlen=32), **extra)
    return run_prune(config)


@pytest.mark.parametrize(("kind", "extra"), [
    ("llama6", {"method": "wanda"}),
    ("llama6", {"method": "sparsegpt", "reconstruct_split": True, "reconstruct_inputs": "sparse"}),
    ("gemma3_text", {"method": "wanda", "reconstruct_params": "norms", "dtype": "bfloat16"}),
    ("opt", {"method": "magnitude", "reconstruct_split": True}),
])
def test_streamed_reconstruction_equals_in_memory_bit_for_bit(kind, extra, tiny_models, tiny_llama_6, calib_file,
                                                               tmp_path):
    model = tiny_llama_6 if kind == "llama6" else tiny_models[kind]
    in_memory = _prune(model, tmp_path / "a", calib_file, low_memory=False, activations_on_disk=False, **extra)
    streamed = _prune(model, tmp_path / "b", calib_file, low_memory=True, activations_on_disk=True, **extra)
    assert streamed.low_memory and streamed.activations_on_disk
    losses = lambda result: [(b["first_loss"], b["last_loss"]) for b in result.reconstruction["blocks"]]  # noqa: E731
    assert losses(streamed) == losses(in_memory)
    expected, written = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert set(written) == set(expected)
    assert all(torch.equal(written[name], expected[name]) for name in expected)
    assert streamed.mask_checksum == in_memory.mask_checksum
    assert not any(tmp_path.glob(".*activations*")), "activation files were left behind"


def test_prune_reconstruct_through_the_cli(tiny_models, calib_file, tmp_path):
    args = ["prune", "--model", str(tiny_models["qwen2"]), "--out", str(tmp_path / "out"), "--calib", str(calib_file),
            "--nsamples", "4", "--seqlen", "32", "--sparsity", "0.5", "--reconstruct", "--reconstruct-steps", "3",
            "--reconstruct-params", "norms", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["reconstruction"]["params"] == "norms" and len(report["reconstruction"]["blocks"]) == 2
    manifest = json.loads((tmp_path / "out" / "losa_manifest.json").read_text())
    assert manifest["settings"]["reconstruct"] is True and manifest["results"]["reconstruction"]["steps"] == 3
    bad = CliRunner().invoke(app, args[:-1] + ["--reconstruct-lr", "2", "--reconstruct-params", "all", "--force"])
    assert bad.exit_code == 2
    assert "--reconstruct-lr must be in (0, 1)" in bad.output and "--reconstruct-params 'all' is unknown" in bad.output


def test_recover_with_reconstruction_resumes_exactly(tiny_llama_6, calib_file, tmp_path):
    from test_recover import assert_resumed_like_straight, config

    from losa_cli.recover import run_recover

    data = tmp_path / "train.txt"
    data.write_text(" ".join(["the sparse model keeps its zeros"] * 200))
    extra = dict(reconstruct=True, reconstruct_steps=3, reconstruct_batch=2, reconstruct_lr=1e-3)
    straight = run_recover(config(tiny_llama_6, tmp_path / "a", data, calib_file, **extra))
    assert all(s.reconstruction and len(s.reconstruction["blocks"]) == 6 for s in straight.stages)
    with pytest.raises(StopRun):  # killed inside stage 1's training: stage 2 prunes and fits in the resumed run
        run_recover(config(tiny_llama_6, tmp_path / "b", data, calib_file, **extra), stop_after(4))
    resumed = run_recover(config(tiny_llama_6, tmp_path / "b", data, calib_file, resume=True, **extra))
    assert resumed.resumed_from == {"stage": 1, "step": 3}
    fits = lambda result: [[(b["first_loss"], b["last_loss"]) for b in s.reconstruction["blocks"]]  # noqa: E731
                           for s in result.stages]
    assert fits(resumed) == fits(straight)
    assert_resumed_like_straight(resumed, straight, tmp_path / "b", tmp_path / "a")


def test_nm_stages_that_repeat_the_pattern_skip_their_fits(tiny_llama_6, calib_file, tmp_path, monkeypatch):
    """2:4 over three stages (1:4, 2:4, 2:4): the third prunes nothing new, so its fits are skipped; forced to
    run, every fit starts and ends at an MSE of exactly 0 and the saved weights are the same bit for bit."""
    from test_recover import base_weights, config

    from losa_cli.recover import run_recover
    from losa_cli.recover import stages as recover_stages

    data = tmp_path / "train.txt"
    data.write_text(" ".join(["the sparse model keeps its zeros"] * 200))
    extra = dict(reconstruct=True, reconstruct_steps=3, reconstruct_batch=2, reconstruct_lr=1e-3, sparsity=None,
                 pattern="2:4", stages=3, mean_ranks=[4.0, 5.0, 6.0], total_steps=6)
    skipped = run_recover(config(tiny_llama_6, tmp_path / "skipped", data, calib_file, **extra))
    assert [s.pattern for s in skipped.stages] == ["1:4", "2:4", "2:4"]
    assert skipped.stages[1].reconstruction["blocks"][0]["first_loss"] > 0
    assert skipped.stages[2].reconstruction is None
    monkeypatch.setattr(recover_stages, "repeats_pattern", lambda config, stage: False)
    fitted = run_recover(config(tiny_llama_6, tmp_path / "fitted", data, calib_file, **extra))
    blocks = fitted.stages[2].reconstruction["blocks"]
    assert len(blocks) == 6 and all(b["first_loss"] == 0.0 and b["last_loss"] == 0.0 for b in blocks)
    ours, reference = base_weights(tmp_path / "skipped"), base_weights(tmp_path / "fitted")
    assert all(torch.equal(ours[name], reference[name]) for name in reference)


@pytest.mark.parametrize("loss", ["kd", "ce"])  # the live teacher's blocks, or a frozen copy of the input model
def test_recover_fits_every_stage_to_the_dense_model_when_told(loss, tiny_llama_6, calib_file, tmp_path, monkeypatch):
    """reconstruct_target dense: stage 2 fits its blocks to exactly stage 1's targets (the input model's blocks on
    the input model's stream); with the default (stage), stage 2's targets are its own blocks before its pruning."""
    from test_recover import config

    from losa_cli.prune import reconstruction
    from losa_cli.recover import run_recover

    data = tmp_path / "train.txt"
    data.write_text(" ".join(["the sparse model keeps its zeros"] * 200))
    real_fit = reconstruction.fit_block

    def targets_of(target: str) -> list[list[torch.Tensor]]:
        seen: list[torch.Tensor] = []

        def recording(step, inputs, targets, *args):
            seen.append(torch.cat([window.clone() for window in targets]))
            return real_fit(step, inputs, targets, *args)

        monkeypatch.setattr(reconstruction, "fit_block", recording)
        run_recover(config(tiny_llama_6, tmp_path / target, data, calib_file, reconstruct=True, reconstruct_steps=3,
                           reconstruct_batch=2, reconstruct_lr=1e-3, loss=loss, reconstruct_target=target,
                           force=True))
        return [seen[:6], seen[6:]]  # stage 1's six blocks, stage 2's

    first, second = targets_of("dense")
    assert len(second) == 6
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    first, second = targets_of("stage")
    for a, b in zip(first, second):
        assert not torch.allclose(a, b, atol=1e-4)
