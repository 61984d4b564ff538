"""LoSiA (``--adapter losia``) as its authors define it: the smoothed sensitivity, the best of three
greedy cores, asynchronous slots with a learning-rate re-warm-up, the trained output head -- and,
as before, only the localised sub-matrix moves, pruned weights stay exactly zero, resume is exact."""

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from test_recover import assert_resumed_like_straight, config
from torch import nn
from typer.testing import CliRunner

from conftest import StopRun, stop_after, tiny_config, tiny_tokenizer
from losa_cli.cli import app
from losa_cli.core.modeling import block_linears, find_blocks, load_model
from losa_cli.recover import run_recover
from losa_cli.recover.subnet import SubnetLinear, Timing, best_core, sensitivity, smooth_scores
from losa_cli.recover.training import Trainer
from losa_cli.run.recipe import section_keys

runner = CliRunner()


# --- the math, on small tensors against hand computations -------------------------------------------------------

def test_sensitivity_and_its_smoothing_match_a_hand_computation():
    weight = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    grad = torch.tensor([[0.5, 0.25], [4.0, -0.1]])
    # W G = [[0.5, -0.5], [0, -0.3]];  |x - x^2 / 2|
    first = torch.tensor([[0.5 - 0.125, 0.5 + 0.125], [0.0, 0.3 + 0.045]])
    torch.testing.assert_close(sensitivity(weight, grad), first)
    average, uncertainty = torch.zeros(2, 2), torch.zeros(2, 2)
    smooth_scores(average, uncertainty, first, 0.85, 0.5)
    torch.testing.assert_close(average, 0.15 * first)  # I_bar = 0.85 * 0 + 0.15 I
    torch.testing.assert_close(uncertainty, 0.5 * 0.85 * first)  # U_bar = 0.5 * 0 + 0.5 |I - I_bar|
    second = torch.tensor([[1.0, 0.0], [2.0, 0.5]])
    smooth_scores(average, uncertainty, second, 0.85, 0.5)
    expected_average = torch.tensor([
        [0.85 * 0.15 * 0.375 + 0.15 * 1.0, 0.85 * 0.15 * 0.625],
        [0.15 * 2.0, 0.85 * 0.15 * 0.345 + 0.15 * 0.5],
    ])
    torch.testing.assert_close(average, expected_average)
    expected_uncertainty = 0.5 * 0.5 * 0.85 * first + 0.5 * (second - expected_average).abs()
    torch.testing.assert_close(uncertainty, expected_uncertainty)


@pytest.mark.parametrize("scores,rows,cols", [
    # rows by their sums pick row 1 (sum 6), whose best entry is 3; columns first pick column 2 (sum 5), then row 0: 5
    ([[0, 0, 5], [3, 3, 0], [0, 0, 0]], [0], [2]),
    # the transpose: rows first, then the best column over them, wins
    ([[0, 3, 0], [0, 3, 0], [5, 0, 0]], [2], [0]),
    # a tie at 3 among all three: the first (rows and columns apart) is kept, column 1 (column sum 4), not 0
    ([[3, 3, 0], [0, 1, 0]], [0], [1]),
])
def test_best_core_keeps_the_best_of_the_three_greedy_choices(scores, rows, cols):
    chosen_rows, chosen_cols = best_core(torch.tensor(scores, dtype=torch.float32), 1, 1)
    assert chosen_rows.tolist() == rows and chosen_cols.tolist() == cols


def test_best_core_of_a_two_by_two_block_beats_the_independent_choice():
    scores = torch.tensor([[9.0, 9.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 5.0, 5.0, 0.0]])
    # apart: rows {0, 3} (18, 10), columns {1, 2} (14, 7) -> 9 + 5 + 5 + 0 = 19
    # rows then columns: over rows {0, 3} the columns are {0: 9, 1: 14, 2: 5} -> {0, 1}: 9 + 9 + 0 + 5 = 23
    # columns then rows: over columns {1, 2} the rows are {0: 9, 1: 1, 2: 1, 3: 10} -> {0, 3}: 19
    rows, cols = best_core(scores, 2, 2)
    assert rows.tolist() == [0, 3] and cols.tolist() == [0, 1]


# --- one layer trained through the real Trainer.step ---------------------------------------------------------------

@dataclass
class _Batches:
    world: int = 1

    def micro(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        return {"x": torch.randn(4, 5, 16, generator=generator), "labels": torch.zeros(4, 5, dtype=torch.long)}


def sparse_subnet(ratio=0.25, period=100, rewarm=0, seed=0) -> SubnetLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(16, 12)
    with torch.no_grad():
        linear.weight.masked_fill_(torch.rand_like(linear.weight) < 0.5, 0.0)
    k_rows, k_cols = round(ratio * 12), round(ratio * 16)
    return SubnetLinear(linear, k_rows, k_cols, 0, Timing(period, rewarm=rewarm))


def objective(layer: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (layer(batch["x"]) * torch.linspace(-1, 1, 12)).pow(2).sum()


def trainer_for(layer: SubnetLinear, lr: float = 1e-2, weight_decay: float = 0.0) -> Trainer:
    """Trainer.step as recover runs it (record, clip, AdamW, re-warm-up, relocalise), on one layer."""
    from accelerate import Accelerator

    layer.train()
    optimizer = torch.optim.AdamW(layer.trainable(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Trainer(Accelerator(cpu=True), layer, objective, {"layer": layer}, layer.trainable(), optimizer, optimizer,
                   scheduler, _Batches(), grad_accum=1, grad_clip=1e6)


def test_updates_change_only_the_localised_submatrix_and_keep_pruned_weights_zero():
    layer = sparse_subnet()
    pruned = layer.base.weight == 0
    trainer = trainer_for(layer, weight_decay=0.1)
    trainer.step()  # the first step scores, then the subnet is localised (as at a stage start)
    rows, cols = layer.rows.clone(), layer.cols.clone()
    assert int(layer.countdown) == 100 and not layer.delta.any() and not layer.importance.numel()
    assert not trainer.optimizer.state.get(layer.delta)  # the moments of the old sub-matrix are dropped
    before = layer.base.weight.detach().clone()
    for _ in range(4):
        trainer.step()
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


def dense_sensitivity(layer: SubnetLinear, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Independently: |W G - (W G)^2 / 2| with G the autograd gradient of the effective weight."""
    effective = layer.base.weight.detach().clone()
    effective[layer.rows[:, None], layer.cols] += (layer.delta * layer.sub_mask()).detach()
    effective.requires_grad_(True)
    (F.linear(batch["x"], effective, layer.base.bias) * torch.linspace(-1, 1, 12)).pow(2).sum().backward()
    product = effective.grad * effective.detach()
    return (product - 0.5 * product**2).abs()


def test_scores_are_smoothed_over_the_slot_and_relocalisation_takes_the_best_core():
    """Period 3: after the first (stage-start) relocalisation the layer scores 3 steps, smoothing the
    sensitivity of the weights each gradient belongs to, then relocalises on I_bar * U_bar."""
    layer = sparse_subnet(ratio=0.5, period=3, seed=3)
    trainer = trainer_for(layer, lr=5e-2)
    trainer.step()
    assert int(layer.countdown) == 3 and not bool(layer.fresh)
    average, uncertainty = torch.zeros(12, 16), torch.zeros(12, 16)
    for step in range(3):
        importance = dense_sensitivity(layer, trainer.batches.micro(trainer.global_step))
        smooth_scores(average, uncertainty, importance, 0.85, 0.85)
        if step < 2:
            trainer.step()
            torch.testing.assert_close(layer.importance, average)
            torch.testing.assert_close(layer.uncertainty, uncertainty)
    effective = layer.effective_weight()
    trainer.step()  # the third scored step, then the relocalisation
    expected_rows, expected_cols = best_core(average * uncertainty, 6, 8)
    assert layer.rows.tolist() == expected_rows.tolist() and layer.cols.tolist() == expected_cols.tolist()
    assert not layer.importance.numel() and int(layer.countdown) == 3  # one slot of one layer: every T steps
    moved = layer.base.weight.detach() != effective
    assert moved.any()  # the third step's update was folded in ...
    assert not (moved & (effective == 0)).any()  # ... and no pruned weight came back


def test_the_learning_rate_rewarms_after_a_periodic_relocalisation_only():
    """Period 4, re-warm-up 2: no ramp after the stage-start relocalisation (the stage warms up),
    half the step on the first step after the periodic one, the full step on the next."""
    warm, plain = sparse_subnet(period=4, rewarm=2, seed=5), sparse_subnet(period=4, rewarm=0, seed=5)
    warm_trainer, plain_trainer = trainer_for(warm), trainer_for(plain)
    factors = []
    for step in range(10):
        factors.append(warm.rewarm_factor())
        before_warm, before_plain = warm.delta.detach().clone(), plain.delta.detach().clone()
        warm_trainer.step()
        plain_trainer.step()
        if step < 5:  # the same run until the periodic relocalisation after step 5
            torch.testing.assert_close(warm.delta, plain.delta)
        if step == 5:  # the same state before this step: half the update
            torch.testing.assert_close(warm.delta - before_warm, 0.5 * (plain.delta - before_plain))
    assert factors == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 0.5]
    warm.merge()
    warm.unmerge(new_mask=True)  # a new stage: relocalise after its first step, without a ramp
    for _ in range(2):
        assert warm.rewarm_factor() == 1.0
        warm_trainer.step()


def test_unmerge_with_a_new_mask_rereads_it_and_relocalises_after_the_next_step():
    """As at a stage start: merge, prune a weight inside the core sub-matrix, unmerge(new_mask=True)."""
    layer = sparse_subnet()
    trainer = trainer_for(layer)
    for _ in range(3):
        trainer.step()
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
    assert not layer.mask[row, col] and int(layer.countdown) == 1 and bool(layer.fresh)
    torch.testing.assert_close(layer(x), merged)  # same function, the pruned weight out of the update
    trainer.step()
    layer.merge()
    assert layer.base.weight[row, col] == 0 and int(layer.countdown) == 100  # relocalised after that step


# --- whole runs -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """A tiny 2-block Llama whose output head shares the embedding matrix (as SmolLM2's does)."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tied") / "llama"
    tokenizer = tiny_tokenizer(add_bos=False)
    settings = tiny_config("llama", len(tokenizer))
    settings.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(settings).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def short_run(model, out, plain_text, calib_file, **extra):
    return run_recover(config(model, out, plain_text, calib_file, adapter="losia", losia_ratio=0.25,
                              steps_per_stage=[2, 4], lr=2e-2, **extra))


def test_losia_trains_a_copy_of_a_tied_head_and_leaves_the_embedding(tied_llama, calib_file, plain_text, tmp_path):
    original = load_model(str(tied_llama)).model.get_input_embeddings().weight.detach().clone()
    result = short_run(tied_llama, tmp_path / "head", plain_text, calib_file, losia_head=0.5, losia_period=1)
    model = load_model(str(tmp_path / "head")).model
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is not embedding and not model.config.tie_word_embeddings
    assert torch.equal(embedding, original)  # the embedding is intact
    assert not torch.equal(head, original)  # the head trained
    assert any("lm_head was tied" in w for w in result.warnings)
    short_run(tied_llama, tmp_path / "frozen", plain_text, calib_file, losia_head=0.0)
    model = load_model(str(tmp_path / "frozen")).model
    assert model.config.tie_word_embeddings and torch.equal(model.get_output_embeddings().weight, original)


def test_losia_trains_a_pruned_head_without_reviving_its_zeros(tied_llama, calib_file, plain_text, tmp_path):
    pruned = tmp_path / "pruned"
    done = runner.invoke(app, ["prune", "--model", str(tied_llama), "--out", str(pruned), "--calib", str(calib_file),
                               "--nsamples", "4", "--seqlen", "32", "--sparsity", "0.5", "--prune-lm-head"])
    assert done.exit_code == 0, done.output
    before = load_model(str(pruned)).model.get_output_embeddings().weight.detach().clone()
    short_run(pruned, tmp_path / "out", plain_text, calib_file, losia_head=1.0)
    head = load_model(str(tmp_path / "out")).model.get_output_embeddings().weight
    assert bool((head[before == 0] == 0).all())  # exactly zero
    assert bool((head[before != 0] != before[before != 0]).all())  # every kept weight of the (whole) head trained


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
                                losia_period=1, steps_per_stage=[4, 12], lr=2e-2))
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
    assert manifest["settings"]["adapter"] == "losia" and manifest["settings"]["losia_period"] == 1


def test_losia_resume_mid_stage_matches_an_uninterrupted_run(tiny_llama_6, calib_file, plain_text, tmp_path):
    """Stopped at stage 1 step 4 (checkpoints every 2 steps), with the head (slot 0) re-warming after
    its relocalisation at step 3 and block 0 (slot 1) halfway through scoring its slot: the resumed
    run ends exactly where an uninterrupted one does, through the next stage's pruning."""
    settings = dict(adapter="losia", losia_ratio=0.25, losia_period=2, losia_rewarm=3, losia_head=0.5,
                    reset_optimizer=False, checkpoint_every=2)
    straight = run_recover(config(tiny_llama_6, tmp_path / "a", plain_text, calib_file, **settings))
    with pytest.raises(StopRun):
        run_recover(config(tiny_llama_6, tmp_path / "b", plain_text, calib_file, **settings), stop_after(4))
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "b.checkpoint" / "blocks.safetensors"))
    assert state["0.mlp.up_proj.importance"].numel() and int(state["6.since"]) == 1  # mid-slot, mid-re-warm-up
    resumed = run_recover(config(tiny_llama_6, tmp_path / "b", plain_text, calib_file, resume=True, **settings))
    assert resumed.resumed_from == {"stage": 1, "step": 4}
    assert_resumed_like_straight(resumed, straight, tmp_path / "b", tmp_path / "a")
    heads = [load_model(str(tmp_path / n)).model.get_output_embeddings().weight for n in ("a", "b")]
    torch.testing.assert_close(heads[0], heads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra,message", [
    (["--adapter", "lora"], "--adapter 'lora' is unknown; choose one of masked-lora, losia"),
    (["--adapter", "losia", "losia_ratio=0"], "losia_ratio must be in (0, 1]"),
    (["--adapter", "losia", "losia_period=0"], "losia_period must be at least 1"),
    (["--adapter", "losia", "losia_beta1=1"], "losia_beta1 must be in [0, 1)"),
    (["--adapter", "losia", "losia_rewarm=-1"], "losia_rewarm must be at least 0"),
    (["--adapter", "losia", "losia_head=2"], "losia_head must be in [0, 1]"),
    (["reconstruct_target=foo"], "reconstruct_target 'foo' is unknown; choose one of stage, dense"),
])
def test_bad_adapter_settings_get_one_line(tiny_llama_6, calib_file, plain_text, tmp_path, extra, message):
    result = runner.invoke(app, ["recover", "--model", str(tiny_llama_6), "--out", str(tmp_path / "o"), "--data",
                                 str(plain_text), "--calib", str(calib_file), *extra])
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output, result.stderr
    keys = {"adapter", "losia_ratio", "losia_period", "losia_beta1", "losia_beta2", "losia_rewarm", "losia_head",
            "reconstruct_target"}
    assert keys <= set(section_keys("recover"))  # recipes take them too

