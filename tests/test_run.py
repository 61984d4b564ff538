"""``losa run`` on a tiny model: every stage, the report, skipping finished stages after a crash,
resuming an interrupted recover stage, all recipe problems reported together, shipped examples valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import StopRun, stop_after
from losa_cli.cli import app
from losa_cli.core.errors import ConfigError
from losa_cli.core.manifest import lineage, manifest_hash, read_manifest
from losa_cli.run import DEFAULT_RECIPE, RunConfig, collect_recipe, load_recipe, read_recipe_file
from losa_cli.run import pipeline as run_module
from losa_cli.run.pipeline import run_pipeline

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def tiny_recipe(model: Path, calib: Path, evaluation: Path, **sections) -> dict:
    """A recipe that runs every stage in seconds on the 6-block tiny Llama."""
    recipe = {
        "model": str(model),
        "seed": 0,
        "device": "cpu",
        "prune": {"method": "wanda", "sparsity": 0.3, "calib": str(calib), "nsamples": 4, "seqlen": 32},
        "recover": {
            "sparsity": 0.5,
            "allocation": "uniform",
            "stages": 2,
            "steps_per_stage": [2, 2],
            "mean_ranks": [2, 3],
            "rank_max": 4,
            "alpha": 8.0,
            "data": str(calib),
            "calib": str(calib),
            "nsamples": 4,
            "seqlen": 32,
            "error_samples": 2,
            "max_length": 32,
            "batch_size": 2,
            "checkpoint_every": 1,
        },
        "export": {"onnx": True},
        # --seqlen 16: DeepSparse 1.8 segfaults on dense width-32 graphs below 16 tokens
        "bench": {
            "engines": "onnxruntime",
            "seqlen": 16,
            "decode_tokens": 2,
            "iterations": 1,
            "warmup": 0,
            "threads": 1,
        },
        "eval": {"data": str(evaluation), "seqlen": 32, "max_windows": 4},
    }
    recipe.update(sections)
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_run_end_to_end_through_the_cli(tiny_llama_6, calib_file, eval_file, tmp_path):
    config = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tiny_llama_6, calib_file, eval_file))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(config), "recover.total_steps=4", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [s["name"] for s in report["stages"]] == ["prune", "recover", "export", "dense-export", "bench", "eval"]
    assert {s["status"] for s in report["stages"]} == {"ran"}
    assert report["final_model"] == str(out / "export")
    assert report["global_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert report["perplexity_before"] > 1 and report["perplexity_after"] > 1
    assert {row["phase"] for row in report["speedups"]} == {"prefill", "decode"}
    # every stage's folder has its manifest and marker; the chain links them by hash
    for stage in report["stages"]:
        folder = Path(stage["folder"])
        assert manifest_hash(read_manifest(folder)) == stage["manifest_sha256"]
        assert (folder / run_module.STAGE_MARKER).is_file()
    chain = lineage(out / "export")
    assert [m["command"] for m in chain] == ["export", "recover", "prune"]
    bench = read_manifest(out / "bench")
    assert bench["parent_manifest"]["sha256"] == manifest_hash(read_manifest(out / "export"))
    assert bench["inputs"]["dense_baseline_manifest_sha256"] == manifest_hash(read_manifest(out / "dense-export"))
    inspect = runner.invoke(app, ["inspect", str(out / "export"), "--json"])
    assert inspect.exit_code == 0, inspect.output
    assert [step["command"] for step in json.loads(inspect.stdout)["lineage"]] == ["export", "recover", "prune"]
    # the report: settings, per-block rates and ranks, perplexity, sparsity, speed; and its PNGs
    text = (out / "report.md").read_text()
    for heading in (
        "## Stages",
        "## Per-block rates and ranks",
        "## Perplexity before and after",
        "## Sparsity verified",
        "## Speed",
        "## Lineage",
        "## Settings",
    ):
        assert heading in text
    assert "total_steps: 4" in text and "speed-up" in text and "identical zeros" in text
    # lean outputs: the dense baseline is graphs only; the export links the recovered weights; bytes per stage
    assert (
        not (out / "dense-export" / "model.safetensors").exists()
        and (out / "dense-export" / "onnx" / "weights.data").is_file()
    )
    assert (out / "export" / "model.safetensors").stat().st_ino == (out / "recover" / "model.safetensors").stat().st_ino
    assert "on disk" in text and "linked)" in text and "**all stages**" not in text and "all stages" in text
    for png in ("allocation.png", "loss.png", "bench/speed.png"):
        assert (out / png).stat().st_size > 1000, png
    # the resolved recipe reproduces the run: everything is skipped
    again = runner.invoke(app, ["run", str(out / "recipe.yaml"), "--out", str(out), "--json"])
    assert again.exit_code == 0, again.output
    assert {s["status"] for s in json.loads(again.stdout)["stages"]} == {"skipped"}


def test_crash_after_stage_two_then_rerun_skips_stages_one_and_two(
    tiny_llama_6, calib_file, eval_file, tmp_path, monkeypatch
):
    recipe = tiny_recipe(tiny_llama_6, calib_file, eval_file, bench=None, eval=None)
    config = RunConfig(recipe=str(write_recipe(tmp_path / "r.yaml", recipe)), out=str(tmp_path / "run"))
    real_export = run_module.run_export

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash in stage 3")

    monkeypatch.setattr(run_module, "run_export", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(config)
    out = tmp_path / "run"
    assert (out / "prune" / "losa_manifest.json").is_file() and (out / "recover" / "losa_manifest.json").is_file()
    assert not (out / "export").exists()
    times = {name: (out / name / "losa_manifest.json").stat().st_mtime_ns for name in ("prune", "recover")}

    monkeypatch.setattr(run_module, "run_export", real_export)
    result = run_pipeline(config)
    assert [(s.name, s.status) for s in result.stages] == [
        ("prune", "skipped"),
        ("recover", "skipped"),
        ("export", "ran"),
    ]
    assert {name: (out / name / "losa_manifest.json").stat().st_mtime_ns for name in times} == times
    assert [m["command"] for m in lineage(out / "export")] == ["export", "recover", "prune"]

    # a changed setting redoes that stage and the ones after it, not the ones before
    changed = run_pipeline(RunConfig(recipe=config.recipe, overrides=["recover.lr=0.001"], out=config.out))
    assert [s.status for s in changed.stages] == ["skipped", "ran", "ran"]
    # --restart redoes everything
    restarted = run_pipeline(
        RunConfig(recipe=config.recipe, overrides=["recover.lr=0.001"], out=config.out, restart=True)
    )
    assert [s.status for s in restarted.stages] == ["ran", "ran", "ran"]


def test_interrupted_recover_stage_resumes_from_its_checkpoint(
    tiny_llama_6, calib_file, eval_file, tmp_path, monkeypatch
):
    recipe = tiny_recipe(tiny_llama_6, calib_file, eval_file, prune=None, export=None, bench=None, eval=None)
    config = RunConfig(recipe=str(write_recipe(tmp_path / "r.yaml", recipe)), out=str(tmp_path / "run"))
    real_recover = run_module.run_recover
    monkeypatch.setattr(run_module, "run_recover", lambda cfg, progress=None: real_recover(cfg, stop_after(3)))
    with pytest.raises(StopRun):
        run_pipeline(config)
    assert (tmp_path / "run" / "recover.checkpoint").is_dir()
    monkeypatch.setattr(run_module, "run_recover", real_recover)
    result = run_pipeline(config)
    assert [(s.name, s.status) for s in result.stages] == [("recover", "resumed")]
    assert not (tmp_path / "run" / "recover.checkpoint").exists()


def test_recipe_problems_are_reported_together_before_any_work(tiny_llama_6, calib_file, eval_file, tmp_path):
    recipe = tiny_recipe(tiny_llama_6, calib_file, eval_file)
    recipe["prune"].update(pattern="2:4", allocation="rmi")  # N:M with RMI rates
    recipe["recover"].update(totl_steps=5, rank_max=2, data=str(tmp_path / "missing.jsonl"))  # typo, ranks above r_max
    recipe["export"]["seqlen"] = 8  # fixed ONNX shape that the bench (16 tokens) cannot use
    recipe["benchmark"] = {}
    config = write_recipe(tmp_path / "bad.yaml", recipe)
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(config), "eval.seqlen=oops", "--out", str(out)])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    for expected in (
        "unknown key 'totl_steps'; did you mean 'total_steps'?",
        "unknown key 'benchmark'",
        "prune.pattern and prune.allocation rmi cannot be combined",
        "mean ranks [3.0] lie outside [recover.rank_min, recover.rank_max] = [2, 2]",
        "prune.pattern 2:4 needs recover.pattern 2:4",
        "export.seqlen 8 fixes",
        "eval.seqlen must be an integer, got 'oops'",
        "missing.jsonl does not exist",
    ):
        assert expected in message, expected
    assert not out.exists()  # nothing was run or written


def test_recipe_calibration_sampling_reaches_prune_and_recover(tiny_llama_6, calib_file, eval_file, tmp_path):
    recipe = tiny_recipe(tiny_llama_6, calib_file, eval_file)
    recipe["prune"]["sampling"] = "document"
    recipe["recover"]["sampling"] = "document"
    _, planned = load_recipe(str(write_recipe(tmp_path / "r.yaml", recipe)), out=tmp_path)
    plans = {plan.name: plan for plan in planned}
    assert plans["prune"].config.calibration.sampling == "document"
    assert plans["recover"].config.calibration.sampling == "document"


def test_recipe_encoding_reaches_calibration_and_eval_and_is_checked():
    _, planned = load_recipe(
        None, ["prune.calib=c4", "prune.encoding=latin-1", "recover.encoding=cp1252", "eval.encoding=utf-16"]
    )
    plans = {plan.name: plan for plan in planned}
    assert plans["prune"].config.calibration.encoding == "latin-1"
    assert plans["recover"].config.calibration.encoding == "cp1252"
    assert plans["eval"].config.encoding == "utf-16"
    _, _, problems = collect_recipe(None, ["eval.encoding=no-such-codec"], Path("OUT"))
    assert problems == [
        "eval: eval.encoding 'no-such-codec' is not a text encoding Python knows; give auto or a codec "
        "such as utf-8, latin-1, cp1252"
    ]


def test_overrides_and_yaml_values():
    recipe, _ = load_recipe(
        None,
        [
            "prune.pattern=2:4",
            "prune.calib=c4",
            "recover.pattern=2:4",
            "recover.sparsity=0.5",
            "recover.lr=1e-3",
            "bench=null",
            "recover.mean_ranks=[4, 5, 6, 7, 8]",
        ],
    )
    assert recipe.section("prune") == {"pattern": "2:4", "calib": "c4"}  # not YAML 1.1's base-60 124
    assert recipe.section("recover")["lr"] == 0.001 and recipe.section("bench") is None
    assert recipe.stages() == ["prune", "recover", "export", "eval"]
    with pytest.raises(ConfigError, match="not key=value"):
        load_recipe(None, ["recover.total_steps"])
    with pytest.raises(ConfigError, match="cannot be set in a recipe: losa run chains"):
        load_recipe(None, ["export.model=x"])


def test_default_recipe_is_examples_default_yaml():
    assert read_recipe_file(str(REPO / "examples" / "default.yaml")) == DEFAULT_RECIPE


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_validates(path, monkeypatch):
    text = path.read_text()
    assert text.startswith(f"# losa run examples/{path.name} --out "), "each example is headed by its command"
    recipe, _, problems = collect_recipe(str(path), [], Path("OUT"))
    assert problems == []
    assert recipe.stages()
    # inputs too, where they are available offline (the 7B recipe needs the Hub and your Alpaca-GPT4 file)
    if "meta-llama" not in recipe.model:
        monkeypatch.chdir(REPO)
        assert run_module.input_problems(recipe, REPO / "runs" / "not-there") == []
