"""``losa eval --tasks``: multiple-choice accuracy through lm-eval, checked against the same accuracy
computed by hand with plain torch, on local JSONL tasks (the network is refused throughout)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import WORDS, build_tiny_model
from losa_cli.cli import app
from losa_cli.core.errors import ConfigError, DataError
from losa_cli.core.modeling import load_model
from losa_cli.runtime import EvalConfig
from losa_cli.runtime.zeroshot import read_local_task, resolve_tasks, run_zeroshot

pytest.importorskip("lm_eval")
runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama (no BOS) and a tiny Gemma 3 (its tokenizer adds BOS)."""
    root = tmp_path_factory.mktemp("zeroshot-models")
    return {kind: build_tiny_model(root / kind, kind) for kind in ("llama", "gemma3_text")}



def questions(count: int = 10, seed: int = 0, gold_shift: int = 0) -> list[dict]:
    """Questions of random words with 2-4 choices of 1-4 words (so per-character normalisation matters);
    the key names vary as the format allows, and one query ends with a space (lm-eval moves it)."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        query = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + (" " if index == 3 else "")
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(2, 4))]
        gold = (index + gold_shift) % len(choices)
        query_key, gold_key = [("query", "gold"), ("question", "label"), ("context", "answer")][index % 3]
        rows.append({query_key: query, "choices": choices, gold_key: gold})
    return rows


def write_task(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@torch.no_grad()
def choice_loglikelihood(model, tokenizer, query: str, choice: str) -> float:
    """lm-eval's log-likelihood of ``" " + choice`` after ``query``: the query's trailing spaces move to
    the continuation, context and context + continuation are each tokenised, the continuation's
    tokens are those of the whole past the context's, and the model reads context + continuation
    minus the last token."""
    context = query.rstrip()
    continuation = query[len(context):] + " " + choice
    context_ids = tokenizer.encode(context)
    continuation_ids = tokenizer.encode(context + continuation)[len(context_ids):]
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = torch.log_softmax(model(ids[:, :-1]).logits, dim=-1)[0, -len(continuation_ids):]
    return float(logprobs.gather(1, torch.tensor(continuation_ids)[:, None]).sum())


def accuracy_by_hand(folder: Path, rows: list[dict]) -> tuple[float, float, int]:
    """acc (highest log-likelihood), acc_norm (highest log-likelihood per character of the choice, as
    lm-eval's acc_norm divides by ``len(choice)``; bytes equal characters here), and the number of
    questions where the two pick different choices."""
    loaded = load_model(str(folder))
    right = right_norm = disagree = 0
    for row in rows:
        query = next(row[k] for k in ("query", "question", "context") if k in row)
        gold = next(row[k] for k in ("gold", "label", "answer") if k in row)
        scores = [choice_loglikelihood(loaded.model, loaded.tokenizer, query, choice) for choice in row["choices"]]
        pick = max(range(len(scores)), key=scores.__getitem__)
        pick_norm = max(range(len(scores)), key=lambda i: scores[i] / len(row["choices"][i]))
        right, right_norm, disagree = (
            right + (pick == gold),
            right_norm + (pick_norm == gold),
            disagree + (pick != pick_norm),
        )
    return right / len(rows), right_norm / len(rows), disagree


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("gold_shift", [0, 1], ids=["gold", "gold-shifted"])
def test_accuracy_equals_computation_by_hand(models, tmp_path, connections, arch, gold_shift):
    rows = questions(gold_shift=gold_shift)
    task = write_task(tmp_path / "words.jsonl", rows)
    loaded = load_model(str(models[arch]))
    result = run_zeroshot(loaded.model, loaded.tokenizer, resolve_tasks([str(task)]), batch_size=3)
    acc, acc_norm, disagree = accuracy_by_hand(models[arch], rows)
    assert disagree > 0, "the questions should tell acc from acc_norm"
    (reported,) = result.tasks
    assert (reported.acc, reported.acc_norm) == (pytest.approx(acc), pytest.approx(acc_norm))
    assert reported.samples == len(rows) and reported.num_fewshot == 0 and reported.task == "words"
    assert connections == []


def test_limit_scores_the_first_questions(models, tmp_path):
    rows = questions(seed=1)
    loaded = load_model(str(models["llama"]))
    result = run_zeroshot(
        loaded.model, loaded.tokenizer, resolve_tasks([str(write_task(tmp_path / "t.jsonl", rows))]), limit=4
    )
    acc, acc_norm, _ = accuracy_by_hand(models["llama"], rows[:4])
    assert result.tasks[0].samples == 4 and result.limit == 4
    assert (result.tasks[0].acc, result.tasks[0].acc_norm) == (pytest.approx(acc), pytest.approx(acc_norm))


def test_cli_table_json_and_recorded_settings(models, tmp_path, connections, monkeypatch):
    task = write_task(tmp_path / "my_task.jsonl", questions(seed=2))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # lm-eval and datasets must leave nothing behind here
    (tmp_path / "other").mkdir()
    twin = write_task(tmp_path / "other" / "my_task.jsonl", questions(count=4, seed=3))  # same stem: a second task
    args = ["eval", "--model", str(models["llama"]), "--tasks", f"{task},{twin}", "--num-fewshot", "2"]
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "my_task" in table.stdout and "acc_norm" in table.stdout and "lm-eval 0.4.13" in table.stdout
    # lm-eval's logging and bars are kept off: stderr holds losa's progress lines only
    assert all(line.startswith("zero-shot requests") for line in table.stderr.splitlines() if line.strip()), (
        table.stderr
    )
    result = runner.invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout holds the JSON only
    zeroshot = report["zeroshot"]
    assert [t["task"] for t in zeroshot["tasks"]] == ["my_task", "my_task_2"]
    first = zeroshot["tasks"][0]
    assert first["source"] == str(task.resolve()) and len(first["sha256"]) == 64
    assert (first["version"], first["num_fewshot"], first["samples"]) == ("1.0", 2, 10)
    assert (first["target_delimiter"], first["fewshot_delimiter"]) == (" ", "\n\n")
    assert zeroshot["fewshot_seed"] == 1234 and zeroshot["lm_eval_version"] == "0.4.13"
    assert report["perplexity"] is None and report["sparsity"] is None
    assert connections == [] and list((tmp_path / "cwd").iterdir()) == []


def test_read_local_task_accepts_the_alternative_keys(tmp_path):
    task = read_local_task(write_task(tmp_path / "t.jsonl", questions(count=3)), "t")
    assert [set(row) for row in task.rows] == [{"query", "choices", "gold"}] * 3


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"query": "a", "choices": ["x", "y"], "gold": 2}\n', "gold index 2 is out of range for 2 choices"),
        ('{"query": "  ", "choices": ["x", "y"], "gold": 0}\n', "non-blank text field"),
        ('{"query": "a", "choices": ["x", "y"], "gold": -1}\n', "out of range"),
        ('{"query": "a", "choices": ["x", "y"], "gold": 0}\n{"query": "b", "choices": ["x"', ":2: not valid JSON"),
        ('{"query": "a", "choices": ["x"], "gold": 0}\n', "at least two non-empty strings"),
        ('{"query": "a", "choices": ["x", ""], "gold": 0}\n', "at least two non-empty strings"),
        ('{"query": "a", "choices": ["x", "y"], "gold": "x"}\n', "integer gold"),
        ('{"query": "a", "choices": ["x", "y"], "gold": true}\n', "integer gold"),
        ('{"prompt": "a", "choices": ["x", "y"], "gold": 0}\n', "query / context / question"),
        ('["a", "b"]\n', "expected a JSON object"),
        ("\n\n", "has no questions"),
        (b"\xff\xfe\x00", "not UTF-8"),
    ],
)
def test_bad_task_files_are_refused_with_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        resolve_tasks([str(path)])


def test_task_specs_that_are_not_jsonl_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_tasks([str(tmp_path / "missing.jsonl")])
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(DataError, match="must be a .jsonl file"):
        resolve_tasks([str(tmp_path / "t.json")])


@pytest.mark.parametrize("offline", ["1", None], ids=["HF_HUB_OFFLINE", "no-network"])
def test_hub_task_without_network_fails_fast(models, tmp_path, connections, monkeypatch, offline):
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    task = write_task(tmp_path / "t.jsonl", questions(count=2))
    result = runner.invoke(app, ["eval", "--model", str(models["llama"]), "--tasks", f"{task},hellaswag"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "'hellaswag'" in lines[0] and "cannot be reached" in lines[0] and "local multiple-choice .jsonl" in lines[0]
    assert len(connections) == (0 if offline else 1)  # one probe of the Hub at most, no retries


def test_eval_options_checked_together(models):
    result = runner.invoke(app, ["eval", "--model", str(models["llama"]), "--limit", "0", "--num-fewshot", "-1"])
    assert result.exit_code == 2
    assert "--limit must be at least 1" in result.stderr and "--num-fewshot must be at least 0" in result.stderr
    with pytest.raises(ConfigError, match="--tasks needs comma-separated"):
        EvalConfig(tasks=["a.jsonl", " "])


def test_losa_run_records_accuracy_in_the_eval_manifest_and_report(models, tmp_path, eval_file):
    task = write_task(tmp_path / "my_task.jsonl", questions(count=4))
    recipe = {
        "model": str(models["llama"]),
        "device": "cpu",
        "recover": None,
        "export": None,
        "bench": None,
        "eval": {"data": str(eval_file), "seqlen": 16, "max_windows": 2, "tasks": [str(task)], "num_fewshot": 1},
    }
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    result = runner.invoke(app, ["run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "eval" / "losa_manifest.json").read_text())
    assert manifest["settings"]["tasks"] == [str(task)] and manifest["settings"]["num_fewshot"] == 1
    for model in ("input", "final"):
        (recorded,) = manifest["results"][model]["zeroshot"]["tasks"]
        assert (recorded["task"], recorded["version"], recorded["num_fewshot"], recorded["samples"]) == (
            "my_task",
            "1.0",
            1,
            4,
        )
    assert "| my_task | 1.0 | 1 | 4 |" in (tmp_path / "run" / "report.md").read_text()
