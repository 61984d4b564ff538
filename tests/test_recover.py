"""``losa recover`` end to end on a tiny model: loss goes down, zeros survive, resume, two processes."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import StopRun, stop_after
from losa_cli.cli import app
from losa_cli.core.config import CalibrationConfig
from losa_cli.core.modeling import block_linears, find_blocks, find_linears, load_model
from losa_cli.recover import RecoverConfig, run_recover

runner = CliRunner()


@pytest.fixture(scope="module")
def instructions(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("ft") / "inst.jsonl"
    with path.open("w") as handle:
        for _ in range(40):
            words = " ".join(rng.choice(["cat", "dog", "sun", "moon"]) for _ in range(4))
            handle.write(json.dumps({"instruction": "Repeat.", "input": words, "output": words}) + "\n")
    return path


def config(model, out, data, calib, **extra) -> RecoverConfig:
    settings = dict(
        model=str(model),
        out=str(out),
        data=str(data),
        sparsity=0.6,
        stages=2,
        total_steps=12,
        final_share=0.5,
        calibration=CalibrationConfig(calib=str(calib), nsamples=8, seqlen=32, seed=0),
        error_samples=4,
        rmi_samples=8,
        max_length=48,
        batch_size=4,
        lr=5e-3,
        checkpoint_every=3,
        device="cpu",
        rank_max=8,
        alpha=16.0,
        mean_ranks=[4.0, 6.0],
    )
    settings.update(extra)
    return RecoverConfig(**settings)


def assert_resumed_like_straight(resumed, straight, resumed_folder, straight_folder) -> None:
    """A resumed run equals the uninterrupted one: stage losses, saved weights (fp32 rounding), the zeros."""
    for ours, reference in zip(resumed.stages, straight.stages):
        assert ours.losses == pytest.approx(reference.losses, rel=1e-5)
    a, b = base_weights(straight_folder), base_weights(resumed_folder)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert resumed.mask_checksum == straight.mask_checksum


def base_weights(folder):
    model = load_model(str(folder)).model
    return {
        f"{i}.{n}": lin.weight.detach().clone()
        for i, b in enumerate(find_blocks(model))
        for n, lin in find_linears(b).items()
    }


def test_two_stage_recover_lowers_loss_keeps_zeros_and_writes_everything(
    tiny_llama_6, calib_file, instructions, tmp_path
):
    out = tmp_path / "out"
    args = [
        "recover",
        "--model",
        str(tiny_llama_6),
        "--out",
        str(out),
        "--data",
        str(instructions),
        "--calib",
        str(calib_file),
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        "error_samples=4",
        "rmi_samples=8",
        "--sparsity",
        "0.6",
        "--stages",
        "2",
        "steps_per_stage=[6,14]",
        "max_length=256",
        "batch_size=4",
        "--lr",
        "5e-3",
        "rank_max=8",
        "alpha=16",
        "mean_ranks=[4,6]",
        "--device",
        "cpu",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    stages = report["stages"]
    assert [s["steps"] for s in stages] == [6, 14]
    assert stages[0]["target_sparsity"] == pytest.approx(0.6 * (1 - 0.5**3))
    losses = stages[-1]["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # fine-tuning lowers the training loss
    assert sum(stages[-1]["ranks"]) == 6 * 6 and max(stages[-1]["ranks"]) <= 8
    assert len(set(stages[-1]["ranks"])) > 1  # error-driven, not uniform
    assert report["global_sparsity"] >= 0.6 - 0.02
    # the merged model: loads with transformers, zeros exactly where the adapters' masks say
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.model.layers[0].self_attn.q_proj.weight.eq(0).float().mean() > 0.5
    manifest = json.loads((out / "losa_manifest.json").read_text())
    assert manifest["command"] == "recover" and len(manifest["results"]["stages"]) == 2
    assert not (tmp_path / "out.checkpoint").exists()
    assert not (out / "adapters").exists()  # merged: their unmerged base is never saved, so they would fit nothing


def test_recover_zeros_are_a_superset_of_the_input_zeros(tiny_llama_6, calib_file, plain_text, tmp_path):
    pruned = tmp_path / "pruned"
    assert (
        runner.invoke(
            app,
            [
                "prune",
                "--model",
                str(tiny_llama_6),
                "--out",
                str(pruned),
                "--calib",
                str(calib_file),
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--sparsity",
                "0.5",
            ],
        ).exit_code
        == 0
    )
    before = base_weights(pruned)
    run_recover(
        config(
            pruned,
            tmp_path / "out",
            plain_text,
            calib_file,
            stages=1,
            total_steps=4,
            sparsity=0.5,
            mean_ranks=[4.0],
            allocation="uniform",
            rank_allocation="uniform",
        )
    )
    after = base_weights(tmp_path / "out")
    for name in before:
        assert (after[name][before[name] == 0] == 0).all(), name
        assert not torch.equal(after[name], before[name]), "the adapters changed nothing"


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_llama_6, calib_file, plain_text, tmp_path):
    straight = run_recover(config(tiny_llama_6, tmp_path / "a", plain_text, calib_file, dropout=0.1))
    with pytest.raises(StopRun):
        run_recover(config(tiny_llama_6, tmp_path / "b", plain_text, calib_file, dropout=0.1), stop_after(8))
    assert (tmp_path / "b.checkpoint").is_dir() and not (tmp_path / "b").exists()
    resumed = run_recover(config(tiny_llama_6, tmp_path / "b", plain_text, calib_file, dropout=0.1, resume=True))
    assert resumed.resumed_from == {"stage": 2, "step": 0}  # checkpoint at the start of stage 2 (steps 6 + 2 of 12)
    assert_resumed_like_straight(resumed, straight, tmp_path / "b", tmp_path / "a")


def test_resume_refuses_other_settings_and_stale_checkpoints(tiny_llama_6, calib_file, plain_text, tmp_path):
    from losa_cli.core.errors import ConfigError

    with pytest.raises(StopRun):
        run_recover(config(tiny_llama_6, tmp_path / "c", plain_text, calib_file), stop_after(2))
    with pytest.raises(ConfigError, match="other settings .*sparsity"):
        run_recover(config(tiny_llama_6, tmp_path / "c", plain_text, calib_file, sparsity=0.5, resume=True))
    with pytest.raises(ConfigError, match="pass --resume"):
        run_recover(config(tiny_llama_6, tmp_path / "c", plain_text, calib_file))
    with pytest.raises(ConfigError, match="no checkpoint"):
        run_recover(config(tiny_llama_6, tmp_path / "d", plain_text, calib_file, resume=True))


def test_nan_loss_stops_and_keeps_the_checkpoint(tiny_llama_6, calib_file, plain_text, tmp_path, monkeypatch):
    from losa_cli.core.errors import NumericalError
    from losa_cli.recover import training as recover

    real = recover._restore_inactive
    calls = {"n": 0}

    def poison(saved):
        real(saved)
        calls["n"] += 1
        if calls["n"] == 4:
            for wrapper, _, _ in saved:
                with torch.no_grad():
                    wrapper.lora_B.fill_(float("nan"))

    monkeypatch.setattr(recover, "_restore_inactive", poison)
    with pytest.raises(NumericalError, match=r"stage \d step \d+; the last good checkpoint"):
        run_recover(config(tiny_llama_6, tmp_path / "n", plain_text, calib_file, mean_ranks=[2.0, 2.0], rank_max=4))
    assert (tmp_path / "n.checkpoint" / "losa_state.json").is_file() and not (tmp_path / "n").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--sparsity", "1.2"], "--sparsity must be in [0, 1)"),
        (["rank_max=4"], "mean ranks"),
        (["--stages", "2", "steps_per_stage=[3]"], "steps_per_stage gives 1 values for 2 stages"),
        (["--method", "magnitude"], "wanda or sparsegpt"),
    ],
)
def test_recover_bad_settings(tiny_llama_6, calib_file, plain_text, tmp_path, extra, message):
    result = runner.invoke(
        app,
        [
            "recover",
            "--model",
            str(tiny_llama_6),
            "--out",
            str(tmp_path / "o"),
            "--data",
            str(plain_text),
            "--calib",
            str(calib_file),
            *extra,
        ],
    )
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_recover_bad_data(tiny_llama_6, calib_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    args = [
        "recover",
        "--model",
        str(tiny_llama_6),
        "--out",
        str(tmp_path / "o"),
        "--calib",
        str(calib_file),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "rmi_samples=4",
        "error_samples=2",
    ]
    result = runner.invoke(app, args + ["--data", str(bad)])
    assert result.exit_code == 2 and "bad.jsonl:2: not valid JSON" in result.stderr, result.stderr
    result = runner.invoke(app, args + ["--data", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "does not exist" in result.stderr
    (tmp_path / "empty.txt").write_text("")
    result = runner.invoke(app, args + ["--data", str(tmp_path / "empty.txt")])
    assert result.exit_code == 2 and "holds no text" in result.stderr


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_llama_6, calib_file, plain_text, tmp_path):
    common = [
        "recover",
        "--model",
        str(tiny_llama_6),
        "--data",
        str(plain_text),
        "--calib",
        str(calib_file),
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        "error_samples=4",
        "rmi_samples=8",
        "--sparsity",
        "0.5",
        "--stages",
        "2",
        "steps_per_stage=[3,4]",
        "max_length=48",
        "--lr",
        "5e-3",
        "rank_max=8",
        "alpha=16",
        "mean_ranks=[4,6]",
        "--device",
        "cpu",
        "response_only=false",
        "--json",
    ]
    one = runner.invoke(app, common + ["--out", str(tmp_path / "one"), "batch_size=4"])
    assert one.exit_code == 0, one.output
    losa = Path(sys.executable).parent / "losa"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            str(losa),
            *common,
            "--out",
            str(tmp_path / "two"),
            "batch_size=2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout[two.stdout.index("{") :])
    assert b["processes"] == 2 and a["processes"] == 1
    for sa, sb in zip(a["stages"], b["stages"]):
        assert sb["losses"] == pytest.approx(sa["losses"], rel=1e-4, abs=1e-5)
    wa, wb = base_weights(tmp_path / "one"), base_weights(tmp_path / "two")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss", ["ce", "squarehead"])
def test_resume_mid_stage_restores_optimizer_moments_and_schedule(
    loss, tiny_llama_6, calib_file, plain_text, tmp_path, monkeypatch
):
    """Stopped inside stage 2 (after AdamW has built moments and the schedule has moved), the
    resumed run ends exactly where an uninterrupted one does, with CE and with distillation from
    the dense teacher (kd + feature loss); checkpoints hold no pickles."""
    settings = dict(dropout=0.1, reset_optimizer=False, loss=loss)
    straight = run_recover(config(tiny_llama_6, tmp_path / "a", plain_text, calib_file, **settings))
    with pytest.raises(StopRun):
        run_recover(config(tiny_llama_6, tmp_path / "b", plain_text, calib_file, **settings), stop_after(10))
    files = sorted(p.name for p in (tmp_path / "b.checkpoint").iterdir())
    assert all(name.endswith((".safetensors", ".json")) for name in files), files
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("resume must not unpickle anything"))
    resumed = run_recover(config(tiny_llama_6, tmp_path / "b", plain_text, calib_file, resume=True, **settings))
    assert resumed.resumed_from == {"stage": 2, "step": 3}  # steps 6 + 4 of 12, last checkpoint every 3 steps
    for ours, reference in zip(resumed.stages, straight.stages):
        assert ours.losses == pytest.approx(reference.losses, rel=1e-5)
    a, b = base_weights(tmp_path / "a"), base_weights(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def _zero_masks(model_or_blocks):
    from losa_cli.core.modeling import block_linears

    return {name: (linear.weight.detach() == 0).clone() for name, linear in block_linears(model_or_blocks).items()}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_nm_recover_ends_exactly_nm_and_never_revives(
    method, tiny_llama_6, calib_file, plain_text, tmp_path, monkeypatch
):
    """--pattern 2:4 ramps 1:4 -> 2:4 and ends with exactly 2 zeros in every group of 4; every
    stage's zeros contain the previous stage's (checked from outside, after each prune)."""
    from losa_cli.recover import stages as workflow

    seen = []
    real_prune_blocks = workflow.prune_blocks

    def recording(model, *args, **kwargs):
        warnings = real_prune_blocks(model, *args, **kwargs)
        seen.append(_zero_masks(find_blocks(model)))
        return warnings

    monkeypatch.setattr(workflow, "prune_blocks", recording)
    out = tmp_path / "nm"
    args = [
        "recover",
        "--model",
        str(tiny_llama_6),
        "--out",
        str(out),
        "--data",
        str(plain_text),
        "--calib",
        str(calib_file),
        "--nsamples",
        "8",
        "--seqlen",
        "32",
        "error_samples=4",
        "rmi_samples=8",
        "--pattern",
        "2:4",
        "--method",
        method,
        "damp=0.02",
        "blocksize=16",
        "--stages",
        "3",
        "steps_per_stage=[2,2,2]",
        "max_length=48",
        "--lr",
        "5e-3",
        "rank_max=8",
        "alpha=16",
        "mean_ranks=[4,5,6]",
        "--device",
        "cpu",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [s["pattern"] for s in report["stages"]] == ["1:4", "2:4", "2:4"]
    assert report["global_sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert len(seen) == 3
    for before, after in zip(seen, seen[1:]):
        for name in before:
            assert bool(after[name][before[name]].all()), f"{name}: a pruned weight came back"
    final = base_weights(out)
    for name, weight in final.items():
        zeros = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(2)
        assert bool((zeros == 2).all()), name
    settings = json.loads((out / "losa_manifest.json").read_text())["settings"]
    assert settings["damp"] == 0.02 and settings["blocksize"] == 16 and settings["sparsity"] is None


def test_recover_stops_when_a_stage_revives_a_weight(tiny_llama_6, calib_file, plain_text, tmp_path, monkeypatch):
    """The revival check compares with the previous stage's mask, so it can fail."""
    from losa_cli.core.errors import NumericalError
    from losa_cli.recover import stages as workflow

    real_prune_blocks = workflow.prune_blocks
    calls = []

    def reviving(model, *args, **kwargs):
        warnings = real_prune_blocks(model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # stage 2: bring one weight pruned in stage 1 back
            linear = next(iter(find_linears(find_blocks(model)[0]).values()))
            index = (linear.weight == 0).nonzero()[0]
            with torch.no_grad():
                linear.weight[tuple(index)] = 1.0
        return warnings

    monkeypatch.setattr(workflow, "prune_blocks", reviving)
    with pytest.raises(NumericalError, match="stage 2 pruning: 1 pruned weights of 0.self_attn.q_proj became non-zero"):
        run_recover(config(tiny_llama_6, tmp_path / "out", plain_text, calib_file))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--pattern", "2:4", "--sparsity", "0.7"], "--sparsity 0.7 contradicts --pattern 2:4"),
        (["damp=0"], "damp must be in (0, 1]"),
        (["blocksize=0"], "blocksize must be positive"),
    ],
)
def test_recover_nm_and_sparsegpt_settings_checked(tiny_llama_6, calib_file, plain_text, tmp_path, extra, message):
    result = runner.invoke(
        app,
        [
            "recover",
            "--model",
            str(tiny_llama_6),
            "--out",
            str(tmp_path / "o"),
            "--data",
            str(plain_text),
            "--calib",
            str(calib_file),
            *extra,
        ],
    )
    assert result.exit_code == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_nm_recover_keeps_crowded_input_groups(method, tiny_llama_6, calib_file, plain_text, tmp_path):
    """A dense model can hold groups of M with more than N exact zeros (the default model, dequantised
    from a 4-bit GGUF, has 473): an N:M run keeps those zeros and ends with exactly N zeros in every
    other group and exactly the input's zeros in those, and says so in one warning (it once refused)."""
    from losa_cli.core.modeling import save_model

    loaded = load_model(str(tiny_llama_6))
    linears = block_linears(find_blocks(loaded.model))
    planted = {"0.self_attn.q_proj": [(0, 0, 3), (5, 8, 4)], "1.mlp.down_proj": [(2, 4, 3)]}
    with torch.no_grad():
        for name, groups in planted.items():
            for row, start, count in groups:
                linears[name].weight[row, start:start + count] = 0.0
    crowded = tmp_path / "crowded"
    save_model(loaded, crowded)
    before = {name: (lin.weight == 0).clone() for name, lin in linears.items()}
    result = run_recover(config(crowded, tmp_path / "out", plain_text, calib_file, sparsity=None, pattern="2:4",
                                method=method, mean_ranks=[4.0, 6.0], stages=2))
    assert any("more than 2 zeros in 3 of" in w and "sparser than 2:4" in w for w in result.warnings), result.warnings
    for name, weight in base_weights(tmp_path / "out").items():
        assert bool((weight[before[name]] == 0).all()), f"{name}: an input zero came back"
        zeros = (weight.reshape(weight.shape[0], -1, 4) == 0).sum(2)
        wanted = (before[name].reshape(weight.shape[0], -1, 4).sum(2)).clamp(min=2)
        assert torch.equal(zeros, wanted), name


def test_recover_survives_activations_beyond_fp16(tiny_llama_6, calib_file, plain_text, tmp_path):
    """A 'massive activation' channel past fp16's 65,504 (Gemma 3's residual stream reaches
    ~84,000) once made every reconstruction error NaN; the dense reference is kept in bf16 (fp32's
    range) and the errors are reduced in fp32."""
    from losa_cli.core.modeling import save_model

    loaded = load_model(str(tiny_llama_6))
    assert not loaded.model.config.tie_word_embeddings
    with torch.no_grad():
        loaded.model.model.embed_tokens.weight[:, 0] = 1e5  # one channel, as in real models
    big = tmp_path / "big"
    save_model(loaded, big)
    result = run_recover(
        config(big, tmp_path / "out", plain_text, calib_file, stages=1, total_steps=2, mean_ranks=[4.0])
    )
    assert all(math.isfinite(e) and e > 0 for e in result.stages[0].errors)
    assert len(set(result.stages[0].ranks)) > 1  # error-driven ranks, not the all-equal fallback


def test_stage_one_takes_its_similarity_from_the_dense_pass(tiny_llama_6, calib_file, plain_text, tmp_path):
    """The setup's dense pass makes the Gram matrices of stage 1's RMI: the same as a similarity pass of
    its own, which stage 1 then skips (stage 2 still runs one: its model has changed)."""
    from losa_cli.prune.allocation import rmi_allocation
    from losa_cli.recover.stages import dense_pass

    model = load_model(str(tiny_llama_6)).model
    torch.manual_seed(0)
    windows = torch.randint(3, 300, (8, 24))
    cpu = torch.device("cpu")
    dense = dense_pass(model, windows, 3, 6, cpu)
    assert len(dense.outputs) == 6 and all(len(outputs) == 3 for outputs in dense.outputs)
    own = rmi_allocation(model, windows[:6], cpu, 0.5, 0.05, 1.0)
    folded = rmi_allocation(model, windows[:6], cpu, 0.5, 0.05, 1.0, grams=dense.grams)
    assert own.rates == folded.rates and own.similarity == folded.similarity
    passes = []
    run_recover(config(tiny_llama_6, tmp_path / "out", plain_text, calib_file),
                lambda description, done, total, info="": passes.append(description) if done == total else None)
    assert passes.count("similarity pass") == 1


def test_nm_target_flags_a_group_past_its_allowance(tiny_llama_6):
    """The end check of an N:M run fails on one zero too many, in an ordinary group or a crowded one, and
    on a group with too few."""
    from losa_cli.recover.stages import NMTarget

    model = load_model(str(tiny_llama_6)).model
    linears = block_linears(find_blocks(model))
    name, weight = "0.mlp.up_proj", linears["0.mlp.up_proj"].weight
    with torch.no_grad():
        weight[0, :3] = 0.0  # a crowded group in the input
        target = NMTarget.of(model, "2:4")
        assert target.crowded == 1 and "more than 2 zeros in 1 of" in target.warning()
        for lin in linears.values():  # prune to 2:4: the two smallest of each group, the crowded one kept as is
            groups = lin.weight.view(lin.weight.shape[0], -1, 4)
            smallest = groups.abs().topk(2, dim=2, largest=False).indices
            groups.scatter_(2, smallest, 0.0)
        assert target.violations(linears) == []
        ordinary = int((weight[1, :4] != 0).nonzero()[0])
        for row, col in [(0, 3), (1, ordinary)]:  # one zero too many: in the crowded group, then in an ordinary one
            kept = weight[row].view(-1, 4)[col // 4].clone()
            weight[row, col] = 0.0
            assert target.violations(linears) == [name]
            weight[row].view(-1, 4)[col // 4] = kept
        weight[1, :4] = 1.0  # too few
        assert target.violations(linears) == [name]
