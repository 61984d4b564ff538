"""``teacher_topk=K``: the dense teacher's top-K rows cached on disk for distillation (``teacher_cache.py``).

Tolerances: the cache keeps the teacher's logits in float16 (shifted so the row's largest is 0; the
relative rounding is 2^-11 ~ 5e-4 of each shifted logit), so a run with K = vocabulary matches the
live teacher to ~1e-4 relative in the loss and ~1e-4 absolute in the weights after 12 AdamW steps; a
cache of the wrong batches (another order, another process's rows) moves the loss by tens of percent.
"""

import gc
import json
from pathlib import Path

import pytest
import torch
from test_recover import assert_resumed_like_straight, base_weights, config
from typer.testing import CliRunner

from conftest import StopRun, stop_after, synthetic_text
from losa_cli.cli import app
from losa_cli.core.modeling import load_model
from losa_cli.recover import run_recover
from losa_cli.recover.losses import cached_kd_loss, kd_loss, top_rows

runner = CliRunner()


@pytest.fixture(scope="module")
def plain_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ft") / "train.txt"
    path.write_text(synthetic_text(60, 80, seed=9))
    return path


@pytest.fixture(scope="module")
def vocab(tiny_llama_6) -> int:
    return int(load_model(str(tiny_llama_6)).model.get_output_embeddings().weight.shape[0])


def binned_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, k: int, temperature: float) -> float:
    """The reference, written independently: both full distributions folded into the teacher's K tokens + the rest."""
    total, count = 0.0, 0
    for s, t in zip(student.reshape(-1, student.shape[-1])[mask.reshape(-1).bool()],
                    teacher.reshape(-1, teacher.shape[-1])[mask.reshape(-1).bool()]):
        p, q = torch.softmax(t.double() / temperature, -1), torch.softmax(s.double() / temperature, -1)
        top = t.topk(k).indices
        rest = torch.ones_like(p, dtype=torch.bool)
        rest[top] = False
        p_bins = torch.cat([p[top], p[rest].sum().reshape(1)])
        q_bins = torch.cat([q[top], q[rest].sum().reshape(1)])
        total += float(torch.xlogy(p_bins, p_bins).sum() - (p_bins * q_bins.log()).sum())
        count += 1
    return total / count * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cached_kd_is_the_kl_over_the_top_k_and_one_tail_bucket(temperature):
    """K = vocabulary: the live loss.  Small K: exactly the KL of both distributions folded into K + 1 outcomes
    (fails without the tail bucket, or with the teacher renormalised over its K tokens), never above the
    full KL, and close to it for a peaked teacher; the gradient is finite."""
    torch.manual_seed(3)
    student = torch.randn(2, 6, 200) * 2
    teacher = student + torch.randn(2, 6, 200)
    teacher[..., :8] += 6.0  # a peaked teacher, as a trained LM's
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    live = float(kd_loss(student, teacher, mask, temperature))
    full = cached_kd_loss(student, *top_rows(teacher, mask, 200, temperature), mask, temperature)
    assert float(full) == pytest.approx(live, rel=1e-3)
    for k in (1, 16, 64):
        value = float(cached_kd_loss(student, *top_rows(teacher, mask, k, temperature), mask, temperature))
        assert value == pytest.approx(binned_kl(student, teacher, mask, k, temperature), rel=1e-3, abs=1e-6)
        assert 0.0 <= value <= live * (1 + 1e-3)
    assert value == pytest.approx(live, rel=0.1)  # K = 64 of 200 holds nearly all of a peaked teacher's mass
    student.requires_grad_(True)
    cached_kd_loss(student, *top_rows(teacher, mask, 200, temperature), mask, temperature).backward()
    assert bool(student.grad.isfinite().all())


def test_cached_kd_refuses_rows_of_another_batch():
    values, indices, lse = top_rows(torch.randn(1, 5, 30), torch.ones(1, 5), 4)
    with pytest.raises(ValueError, match="5 cached teacher rows for 3 attended positions"):
        cached_kd_loss(torch.randn(1, 5, 30), values, indices, lse, torch.tensor([[1, 1, 1, 0, 0]]))


def model_instances(cls) -> int:
    gc.collect()
    return sum(1 for thing in gc.get_objects() if type(thing) is cls)


def test_full_vocabulary_cache_trains_as_the_live_teacher_without_a_teacher_in_memory(
    tiny_llama_6, calib_file, plain_text, tmp_path, vocab
):
    """K = vocabulary trains as the live teacher (stage losses and the saved weights); during training the
    only model in memory is the student (the live run holds two); small K: the first step's loss (the same
    student on the same batch) is a KL over fewer outcomes, so at most the live one; the manifest records
    the cache, and the folder is gone after a successful run."""
    cls = type(load_model(str(tiny_llama_6)).model)
    before = model_instances(cls)
    seen: dict[str, list[int]] = {"live": [], "cached": []}

    def counting(name):
        def progress(description: str, done: int, total: int, info: str = "") -> None:
            if description.endswith(" train") and done == 1:
                seen[name].append(model_instances(cls))
        return progress

    live = run_recover(config(tiny_llama_6, tmp_path / "live", plain_text, calib_file, loss="kd+ce"), counting("live"))
    cached = run_recover(config(tiny_llama_6, tmp_path / "cached", plain_text, calib_file, loss="kd+ce",
                                teacher_topk=vocab), counting("cached"))
    assert seen == {"live": [before + 2] * 2, "cached": [before + 1] * 2}
    for ours, reference in zip(cached.stages, live.stages):
        assert ours.losses == pytest.approx(reference.losses, rel=1e-3)
    a, b = base_weights(tmp_path / "live"), base_weights(tmp_path / "cached")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=3e-4)
    assert cached.mask_checksum == live.mask_checksum
    record = json.loads((tmp_path / "cached" / "losa_manifest.json").read_text())["results"]["teacher_cache"]
    tokens = 12 * 4 * 48  # 12 steps x batch 4 x 48-token windows, every position attended
    assert record["tokens"] == tokens and record["bytes_per_token"] == vocab * 6 + 4 and not record["reused"]
    assert record["teacher_seconds"] > 0 and record["bytes"] >= tokens * record["bytes_per_token"]
    assert not (tmp_path / "cached.teacher").exists()

    small = run_recover(config(tiny_llama_6, tmp_path / "small", plain_text, calib_file, loss="kd+ce",
                               teacher_topk=16, total_steps=2, steps_per_stage=[1, 1]))
    first = run_recover(config(tiny_llama_6, tmp_path / "first", plain_text, calib_file, loss="kd+ce",
                               total_steps=2, steps_per_stage=[1, 1]))
    assert small.stages[0].losses[0] < first.stages[0].losses[0]


def cache_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_resume_reuses_the_cache_and_ends_as_the_uninterrupted_run(tiny_llama_6, calib_file, plain_text, tmp_path):
    """The cache on disk is tokens x (K x 6 + 4) bytes (plus the safetensors headers); a run stopped in stage 2
    resumes with the very cache (not rebuilt) and ends as the uninterrupted run; a cache that was changed on disk
    is rebuilt, with a warning, to the same rows."""
    settings = dict(loss="kd", teacher_topk=5, dropout=0.1)
    straight = run_recover(config(tiny_llama_6, tmp_path / "a", plain_text, calib_file, **settings))
    with pytest.raises(StopRun):
        run_recover(config(tiny_llama_6, tmp_path / "b", plain_text, calib_file, **settings), stop_after(8))
    folder = tmp_path / "b.teacher"
    index = json.loads((folder / "rank0.json").read_text())
    assert index["tokens"] == 12 * 4 * 48
    payload = index["tokens"] * (5 * 6 + 4)
    assert payload <= cache_size(folder) <= payload + 4096 * len(index["files"])
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    resumed = run_recover(config(tiny_llama_6, tmp_path / "b", plain_text, calib_file, resume=True, **settings),
                          lambda *args: written.update(after={p.name: p.stat().st_mtime_ns for p in folder.iterdir()}))
    assert written.pop("after") == written and resumed.teacher_cache["reused"]
    assert_resumed_like_straight(resumed, straight, tmp_path / "b", tmp_path / "a")

    with pytest.raises(StopRun):
        run_recover(config(tiny_llama_6, tmp_path / "c", plain_text, calib_file, **settings), stop_after(8))
    first = sorted((tmp_path / "c.teacher").glob("*.safetensors"))[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 1
    first.write_bytes(bytes(data))
    rebuilt = run_recover(config(tiny_llama_6, tmp_path / "c", plain_text, calib_file, resume=True, **settings))
    assert not rebuilt.teacher_cache["reused"] and any("did not match" in w for w in rebuilt.warnings)
    assert_resumed_like_straight(rebuilt, straight, tmp_path / "c", tmp_path / "a")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--loss", "kd", "teacher_topk=-1"], "teacher_topk must be >= 0"),
        (["--loss", "kd", "teacher_topk=100000"], "teacher_topk 100000 exceeds the model's vocabulary of 320"),
        (["--loss", "squarehead", "teacher_topk=8"], "--loss squarehead also needs its block features"),
        (["teacher_topk=8"], "which --loss ce does not use"),
    ],
)
def test_teacher_topk_bad_settings(tiny_llama_6, calib_file, plain_text, tmp_path, extra, message):
    result = runner.invoke(app, ["recover", "--model", str(tiny_llama_6), "--out", str(tmp_path / "o"), "--data",
                                 str(plain_text), "--calib", str(calib_file), "--nsamples", "8", "--seqlen", "32",
                                 *extra])
    assert result.exit_code == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_teacher_topk_in_a_settings_file(tmp_path):
    """A recipe's recover section and ``losa recover --config FILE`` take the key, typed as an integer."""
    from losa_cli.core.errors import ConfigError
    from losa_cli.run import section_settings, stage_config

    path = tmp_path / "recover.yaml"
    path.write_text("loss: kd\nteacher_topk: 64\n")
    given = section_settings("recover", str(path), ["data=x.txt", "calib=c.txt"], flags=[])
    assert stage_config("recover", given, 0, model="m", out="o").teacher_topk == 64
    with pytest.raises(ConfigError, match="teacher_topk"):
        section_settings("recover", None, ["teacher_topk=many"], flags=[])
