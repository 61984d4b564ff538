"""More bad input, from a review that tried ~130 kinds as a careless user would: text encodings, task files,
recipes, ``losa generate`` / ``export`` / ``recover`` options -- each one ``error:`` line that says what to
change (``expect`` is a piece of it), a non-zero exit, nothing written and the input untouched
(``test_bad_input.assert_one_line_nothing_written``).  Positive neighbours (what must keep working) follow."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest
from test_bad_input import (  # noqa: F401 - fixtures of the cases
    BINARY,
    Ctx,
    assert_one_line_nothing_written,
    eval_,
    export,
    no_network,
    prune,
    recipe,
    recover,
    shared,
)
from typer.testing import CliRunner

from conftest import synthetic_text
from losa_cli.cli import app

runner = CliRunner()
QUESTION = {"query": "the river", "choices": ["runs fast", "is a tree"], "gold": 0}


def utf16(text: str) -> bytes:
    """UTF-16 without a byte-order mark: valid UTF-8, every other byte NUL."""
    return text.encode("utf-16-le")


def task(ctx: Ctx, rows: list[dict] | None = None, content: bytes | None = None) -> str:
    lines = "".join(json.dumps(row) + "\n" for row in rows or [QUESTION] * 3)
    return str(ctx.file("task.jsonl", content if content is not None else lines.encode()))


def fifo(ctx: Ctx, name: str) -> str:
    """A named pipe: reading it blocks until a writer comes (a careless ``--calib`` from a shell trick)."""
    path = ctx.inp / name
    os.mkfifo(path)
    return str(path)


def dangling(ctx: Ctx) -> str:
    link = ctx.inp / "model"
    link.symlink_to(ctx.inp / "moved-away")
    return f"{ctx.inp.name}/model"  # relative, as typed: one slash, like a Hub id


def run_recipe(ctx: Ctx, **sections: str) -> list[str]:
    """A recipe running prune, then the given sections (YAML text each) -- a later stage's input is bad."""
    body = f"model: {ctx.model}\nprune:\n  calib: {ctx.calib}\n  nsamples: 2\n  seqlen: 16\n"
    body += "".join(f"{name}:\n{text}" for name, text in sections.items())
    return recipe(ctx, body)


def generate(ctx: Ctx, *extra: str) -> list[str]:
    return ["generate", "--model", str(ctx.model), "--prompt", "the river", "--max-new-tokens", "2", *extra]


def long_recipe_value(ctx: Ctx) -> list[str]:
    """A recipe under the size limit whose one wrong value is 600 kB long: the line must stay short."""
    return recipe(ctx, f"model: {ctx.model}\nprune:\n  sparsity: [{', '.join(['123456789'] * 60000)}]\n")


CaseWithMessage = tuple[str, Callable[[Ctx], list[str]], str]
CASES: list[CaseWithMessage] = [
    # text: UTF-16 without a byte-order mark, codecs that fail without a decode error, files that are not files
    ("prune-calib-utf16-no-bom", lambda c: prune(c, "--calib", str(c.file("c.txt", utf16(synthetic_text(30, 30)))),
                                                 calib=False), "--encoding utf-16-le"),
    ("eval-data-utf16-no-bom", lambda c: eval_(c, "--data", str(c.file("e.txt", utf16(synthetic_text(30, 30))))),
     "NUL characters"),
    ("recover-data-utf16-be-no-bom", lambda c: recover(c, data=c.file("d.txt", synthetic_text(9, 9).encode(
        "utf-16-be"))), "--encoding utf-16-be"),
    ("eval-encoding-undefined", lambda c: eval_(c, "--data", str(c.calib), "--encoding", "undefined"),
     "cannot be read as undefined"),
    ("prune-calib-a-fifo", lambda c: prune(c, "--calib", fifo(c, "calib"), calib=False), "not a regular file"),
    ("eval-data-dev-zero", lambda c: eval_(c, "--data", "/dev/zero"), "not a regular file"),
    # task files
    ("eval-tasks-utf16-no-bom", lambda c: eval_(c, "--tasks", task(c, content=utf16(json.dumps(QUESTION) + "\n"))),
     "save it as UTF-8"),
    ("eval-tasks-more-shots-than-questions", lambda c: eval_(c, "--tasks", task(c), "--num-fewshot", "5"),
     "--num-fewshot 5 needs at least 6 questions"),
    ("eval-tasks-choice-longer-than-context", lambda c: eval_(c, "--tasks", task(
        c, [QUESTION, {"query": "a", "choices": ["b", "river " * 300], "gold": 0}])), "task.jsonl:2: choice 1"),
    ("eval-tasks-a-fifo", lambda c: eval_(c, "--tasks", fifo(c, "t.jsonl")), "not a file"),
    # recipes: duplicates refused, hostile files bounded, every stage's inputs read before any work
    ("run-recipe-duplicate-section", lambda c: recipe(c, f"model: {c.model}\nprune:\n  calib: {c.calib}\nprune:\n"
                                                         f"  calib: {c.calib}\n"), "line 4: 'prune' is given twice"),
    ("run-recipe-duplicate-key", lambda c: recipe(c, f"model: {c.model}\nprune:\n  calib: {c.calib}\n  sparsity: 0.3\n"
                                                     "  sparsity: 0.9\n"), "'sparsity' is given twice"),
    ("run-recipe-duplicate-top-level", lambda c: recipe(c, f"model: {c.model}\nseed: 1\nseed: 2\n"), "given twice"),
    ("run-recipe-deeply-nested", lambda c: recipe(c, "prune: " + "[" * 50000 + "]" * 50000 + "\n"),
     "nested too deeply"),
    ("run-recipe-huge", lambda c: recipe(c, "prune:\n  sparsity: 0.5\n" + "# padding\n" * 120000),
     "at most 1,048,576 bytes"),
    ("run-recipe-long-value", long_recipe_value, "characters)"),
    ("run-recipe-long-key", lambda c: recipe(c, f"model: {c.model}\nprune:\n  ? {'x' * 100000}\n  : 1\n"),
     "unknown key"),
    ("run-recipe-fifo", lambda c: ["run", fifo(c, "r.yaml"), "--out", str(c.out)], "is not a file"),
    ("run-recipe-a-folder", lambda c: ["run", str(c.inp), "--out", str(c.out)], "is not a file"),
    ("run-later-stage-tasks-bad", lambda c: run_recipe(
        c, eval=f"  data: {c.calib}\n  tasks: [{task(c, content=BINARY)}]\n"), "eval.tasks:"),
    ("run-later-stage-tasks-missing", lambda c: run_recipe(
        c, eval=f"  data: {c.calib}\n  tasks: [{c.inp}/none.jsonl]\n"), "eval.tasks:"),
    ("run-later-stage-data-binary", lambda c: run_recipe(c, recover=f"  data: {c.file('train.txt', BINARY)}\n"
                                                                    f"  calib: {c.calib}\n  sparsity: 0.7\n"),
     "recover.data:"),
    ("run-later-stage-eval-data-utf16", lambda c: run_recipe(
        c, eval=f"  data: {c.file('e.txt', utf16(synthetic_text(9, 9)))}\n"), "eval.data:"),
    ("recover-config-duplicate-key", lambda c: recover(c, "--config", str(c.file("r.yaml", "lr: 0.1\nlr: 0.2\n"))),
     "'lr' is given twice"),
    # generate: numbers that are not numbers, and sampling options without sampling
    ("generate-temperature-nan", lambda c: generate(c, "--sample", "--temperature", "nan"), "--temperature"),
    ("generate-temperature-inf", lambda c: generate(c, "--sample", "--temperature", "inf"), "--temperature"),
    ("generate-top-p-nan", lambda c: generate(c, "--sample", "--top-p", "nan"), "--top-p"),
    ("generate-seed-huge", lambda c: generate(c, "--sample", "--seed", str(2**70)), "--seed must be in"),
    ("generate-seed-negative", lambda c: generate(c, "--sample", "--seed", "-1"), "--seed must be in"),
    ("generate-temperature-without-sample", lambda c: generate(c, "--temperature", "0.5"), "add --sample"),
    ("generate-top-p-and-seed-without-sample", lambda c: generate(c, "--top-p", "0.9", "--seed", "3"),
     "--top-p, --seed apply to sampling only"),
    # export: a fixed length beyond the model's context (it exported, peaking at 3.7 GiB for 90k parameters)
    ("export-seqlen-beyond-context", lambda c: export(c, "--onnx", "--seqlen", "5000"), "context of 256 tokens"),
    # recover: a kd temperature so small that the loss is 0
    ("recover-kd-temperature-tiny", lambda c: recover(c, "kd_temperature=1e-6"), "nothing is learnt"),
    # a model folder that is a link to nowhere: "dir/link" was taken for a Hub id and blamed on the network
    ("prune-model-dangling-link", lambda c: prune(c, model=dangling(c)), "is a link to"),
    ("run-model-dangling-link", lambda c: recipe(c, f"model: {dangling(c)}\nprune:\n  calib: {c.calib}\n"),
     "is a link to"),
    # bench: the losa engine on graphs only -- the real reason, not the engine list
    ("bench-losa-engine-on-graphs", lambda c: ["bench", str(c.file("g.onnx", BINARY)), "--engines", "losa"],
     "the losa engine runs a model's safetensors"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_more_bad_input_one_line_nothing_written(case: CaseWithMessage, shared, tmp_path, no_network,  # noqa: F811
                                                 monkeypatch):
    line = assert_one_line_nothing_written(case[:2], shared, tmp_path, monkeypatch)
    assert case[2] in line, line


def test_byte_order_marks_are_accepted_in_task_and_recipe_files(shared, tmp_path):  # noqa: F811
    """A UTF-8 byte-order mark (Notepad writes one) was refused in task files while data files accepted it."""
    model, calib = shared
    bom = b"\xef\xbb\xbf"
    tasks = tmp_path / "task.jsonl"
    tasks.write_bytes(bom + "".join(json.dumps(QUESTION) + "\n" for _ in range(3)).encode())
    result = runner.invoke(app, ["eval", "--model", str(model), "--tasks", str(tasks), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["zeroshot"]["tasks"][0]["samples"] == 3
    plan = tmp_path / "recipe.yaml"
    plan.write_bytes(bom + f"model: {model}\nprune:\n  calib: {calib}\n  nsamples: 2\n  seqlen: 16\n".encode())
    from losa_cli.run.plan import load_recipe

    loaded, _ = load_recipe(str(plan))
    assert loaded.model == str(model)


def test_zero_shot_scoring_reports_every_request(shared):  # noqa: F811
    """``losa eval --tasks`` on 200 questions ran 4 minutes on SmolLM2 without a line: the first report now
    comes before any request is scored, then one per request (the CLI's plain lines are rate-limited)."""
    from losa_cli.core.modeling import load_model
    from losa_cli.runtime.zeroshot import resolve_tasks, run_zeroshot

    model, _ = shared
    folder = model.parent / "zero-shot-progress"
    folder.mkdir(exist_ok=True)
    path = folder / "ten.jsonl"
    path.write_text("".join(json.dumps({**QUESTION, "choices": ["a", "b", "c", "d"]}) + "\n" for _ in range(10)))
    loaded = load_model(str(model))
    calls: list[tuple[str, int, int]] = []
    run_zeroshot(loaded.model, loaded.tokenizer, resolve_tasks([str(path)]),
                 progress=lambda what, done, total, info="": calls.append((what, done, total)))
    assert calls[0] == ("zero-shot requests", 0, 40)  # before the first request
    assert [done for _, done, _ in calls] == list(range(41))


def test_a_loss_of_zero_from_the_first_steps_is_a_warning(capsys):
    """A stage that learnt nothing (its loss exactly 0 from the start) says so under the recover table."""
    from types import SimpleNamespace

    from losa_cli.cli import render

    stage = SimpleNamespace(stage=1, target_sparsity=0.5, sparsity=0.5, ranks=[2], steps=3, losses=[0.0, 0.0, 0.0])
    learning = SimpleNamespace(**{**vars(stage), "stage": 2, "losses": [2.5, 0.0, 1.9]})
    result = SimpleNamespace(out="out", stages=[stage, learning], global_sparsity=0.5, tokens_trained=48,
                             processes=1, wall_time_s=1.0, mask_checksum="0" * 64)
    render.recover(result)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "stage 1: the loss was exactly 0" in warnings[0], warnings
