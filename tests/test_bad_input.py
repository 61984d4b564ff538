"""Bad input to every command: one ``error:`` line, a non-zero exit, no traceback, nothing written
and the input untouched -- tried as a careless user would.

Each case builds its own broken input under ``IN`` (a corrupt copy of one shared tiny model, a
binary text file, ...) and writes to ``OUT`` or to a path that must be refused; the test then
checks that nothing appeared beside ``IN`` and that ``IN`` and the shared model are unchanged.
Most cases fail while the inputs are checked, before any model is loaded, so the file runs in
seconds.  The network is blocked throughout (``connections``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import NEWS, build_tiny_model, synthetic_text, tiny_tokenizer
from losa_cli.cli import app

runner = CliRunner()
BINARY = bytes(range(256)) * 40  # not UTF-8 (0x80.. are continuation bytes without a lead)
MAX_LINE = 2000  # an error line a person can read (a hostile recipe once made one of 52 MB)


@dataclass
class Ctx:
    """Paths one case may use: the shared tiny model, a calibration file, IN for broken inputs, OUT."""

    model: Path
    calib: Path
    inp: Path
    out: Path

    def model_copy(self, name: str = "m") -> Path:
        target = self.inp / name
        shutil.copytree(self.model, target)
        return target

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.inp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> tuple[Path, Path]:
    """One tiny Llama and one calibration file for every case (built once)."""
    root = tmp_path_factory.mktemp("bad-input")
    calib = root / "calib.txt"
    calib.write_text(synthetic_text(60, 60, seed=1))
    return build_tiny_model(root / "llama", "llama"), calib


def prune(ctx: Ctx, *extra: str, model: Path | str | None = None, out: Path | str | None = None,
          calib: bool = True) -> list[str]:
    args = ["prune", "--model", str(model or ctx.model), "--out", str(out or ctx.out), "--nsamples", "2",
            "--seqlen", "16"]
    return args + (["--calib", str(ctx.calib)] if calib else []) + list(extra)


def recover(ctx: Ctx, *extra: str, data: Path | None = None, out: Path | str | None = None) -> list[str]:
    data = data or ctx.file("train.txt", synthetic_text(20, 40, seed=4))
    return ["recover", "--model", str(ctx.model), "--out", str(out or ctx.out), "--data", str(data),
            "--calib", str(ctx.calib), "--nsamples", "2", "--seqlen", "16", "--stages", "1", "--total-steps", "1",
            "max_length=16", "batch_size=1", "error_samples=1", "rmi_samples=2", "mean_ranks=[2]", "rank_max=2",
            "rank_min=1"] + list(extra)


def eval_(ctx: Ctx, *extra: str, model: Path | None = None) -> list[str]:
    return ["eval", "--model", str(model or ctx.model), "--seqlen", "16", "--max-windows", "2"] + list(extra)


def export(ctx: Ctx, *extra: str, model: Path | None = None, out: Path | None = None) -> list[str]:
    return ["export", str(model or ctx.model), "--out", str(out or ctx.out)] + list(extra)


def bench(ctx: Ctx, model: Path | str, *extra: str) -> list[str]:
    return ["bench", str(model), "--engines", "onnxruntime", "--seqlen", "8", "--decode-tokens", "0", "--warmup", "0",
            "--iterations", "1"] + list(extra)


# --- broken files --------------------------------------------------------------------------


def corrupt_weights(ctx: Ctx, how: str) -> Path:
    folder = ctx.model_copy()
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"random": BINARY, "empty": b"", "truncated": data[: len(data) // 2]}[how])
    return folder


def with_file(ctx: Ctx, name: str, content: bytes | str) -> Path:
    folder = ctx.model_copy()
    (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def gguf(ctx: Ctx, content: bytes) -> Path:
    return ctx.file("model.gguf", content)


def saved_model(ctx: Ctx, config, model_class_name: str) -> Path:
    import transformers

    torch.manual_seed(0)
    folder = ctx.inp / config.model_type
    getattr(transformers, model_class_name)(config).save_pretrained(folder)
    tiny_tokenizer(False).save_pretrained(folder)
    return folder


def bert(ctx: Ctx) -> Path:
    from transformers import BertConfig

    return saved_model(ctx, BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64), "BertLMHeadModel")


def t5(ctx: Ctx) -> Path:
    from transformers import T5Config

    return saved_model(ctx, T5Config(vocab_size=320, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     decoder_start_token_id=0), "T5ForConditionalGeneration")


def onnx_model(ctx: Ctx, truncate: bool = False) -> Path:
    """A small valid ONNX graph (input_ids -> logits), or its first half."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.ones((320, 320), dtype=np.float32), "table")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "input_ids"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 320])], [table])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    return ctx.file("model.onnx", data[: len(data) // 2] if truncate else data)


def regular_file(ctx: Ctx) -> Path:
    return ctx.file("a-file", "not a folder")


def recipe(ctx: Ctx, content: bytes | str) -> list[str]:
    return ["run", str(ctx.file("recipe.yaml", content)), "--out", str(ctx.out)]


def run(ctx: Ctx, out: Path | str) -> list[str]:
    """A valid one-stage recipe, so that only ``out`` is wrong."""
    content = f"model: {ctx.model}\nprune:\n  calib: {ctx.calib}\n  nsamples: 2\n  seqlen: 16\n"
    return ["run", str(ctx.file("recipe.yaml", content)), "--out", str(out)]


# --- the cases: (id, args builder, the path that must not be written) ------------------------

Case = tuple[str, Callable[[Ctx], list[str]]]
CASES: list[Case] = [
    # corrupt, empty or truncated model files
    ("prune-safetensors-random", lambda c: prune(c, model=corrupt_weights(c, "random"))),
    ("eval-safetensors-empty", lambda c: eval_(c, "--sparsity", model=corrupt_weights(c, "empty"))),
    ("inspect-safetensors-truncated", lambda c: ["inspect", str(corrupt_weights(c, "truncated"))]),
    ("export-safetensors-truncated", lambda c: export(c, model=corrupt_weights(c, "truncated"))),
    ("prune-config-not-json", lambda c: prune(c, model=with_file(c, "config.json", "{model_type: llama"))),
    ("inspect-config-empty", lambda c: ["inspect", str(with_file(c, "config.json", ""))]),
    ("eval-config-binary", lambda c: eval_(c, "--sparsity", model=with_file(c, "config.json", BINARY))),
    ("prune-config-a-list", lambda c: prune(c, model=with_file(c, "config.json", "[1, 2]"))),
    ("prune-config-unknown-type", lambda c: prune(c, model=with_file(c, "config.json", '{"model_type": "nonsense"}'))),
    ("prune-tokenizer-corrupt", lambda c: prune(c, model=with_file(c, "tokenizer.json", BINARY))),
    ("prune-gguf-random", lambda c: prune(c, model=gguf(c, BINARY))),
    ("inspect-gguf-empty", lambda c: ["inspect", str(gguf(c, b""))]),
    ("eval-gguf-truncated", lambda c: eval_(c, "--sparsity", model=gguf(c, b"GGUF\x03\x00\x00\x00\x02\x00"))),
    ("prune-manifest-corrupt", lambda c: prune(c, model=with_file(c, "losa_manifest.json", "{broken"))),
    ("inspect-manifest-binary", lambda c: ["inspect", str(with_file(c, "losa_manifest.json", BINARY))]),
    ("inspect-manifest-a-list", lambda c: ["inspect", str(with_file(c, "losa_manifest.json", "[]"))]),
    ("bench-onnx-random", lambda c: bench(c, c.file("model.onnx", BINARY))),
    ("bench-onnx-empty", lambda c: bench(c, c.file("model.onnx", b""))),
    ("bench-onnx-truncated", lambda c: bench(c, onnx_model(c, truncate=True))),
    ("bench-onnx-sidecar-corrupt", lambda c: bench(c, c.file("exp/losa_onnx.json", BINARY).parent)),
    # unsupported models: refused, never pruned
    ("prune-bert", lambda c: prune(c, model=bert(c))),
    ("inspect-bert", lambda c: ["inspect", str(bert(c))]),
    ("prune-t5", lambda c: prune(c, model=t5(c))),
    # data files
    ("prune-calib-binary-txt", lambda c: prune(c, "--calib", str(c.file("calib.txt", BINARY)), calib=False)),
    ("prune-calib-binary-jsonl", lambda c: prune(c, "--calib", str(c.file("calib.jsonl", BINARY)), calib=False)),
    ("prune-calib-empty", lambda c: prune(c, "--calib", str(c.file("calib.txt", "")), calib=False)),
    ("prune-calib-plain-folder", lambda c: prune(c, "--calib", str(c.file("t/a.txt", "hi").parent), calib=False)),
    ("prune-calib-csv", lambda c: prune(c, "--calib", str(c.file("calib.csv", "a,b\n1,2\n")), calib=False)),
    ("prune-calib-jsonl-numbers", lambda c: prune(c, "--calib", str(c.file("calib.jsonl", "1\n2\n")), calib=False)),
    ("eval-data-binary", lambda c: eval_(c, "--data", str(c.file("eval.txt", BINARY)))),
    ("recover-data-binary-jsonl", lambda c: recover(c, data=c.file("train.jsonl", BINARY))),
    ("recover-data-binary-txt", lambda c: recover(c, data=c.file("train.txt", BINARY))),
    # text encodings: a wrong --encoding names the file and byte offset; an unknown codec is refused up front
    (
        "prune-calib-wrong-encoding",
        lambda c: prune(
            c, "--calib", str(c.file("news.txt", NEWS.encode("latin-1"))), "--encoding", "utf-8", calib=False
        ),
    ),
    ("eval-encoding-unknown", lambda c: eval_(c, "--data", str(c.calib), "--encoding", "no-such-codec")),
    ("recover-encoding-not-text", lambda c: recover(c, "encoding=base64")),
    (
        "recover-data-instruction-without-output",
        lambda c: recover(c, data=c.file("train.jsonl", '{"instruction": "x"}\n')),
    ),
    ("eval-tasks-missing-file", lambda c: eval_(c, "--tasks", str(c.inp / "no-such-task.jsonl"))),
    ("eval-tasks-binary", lambda c: eval_(c, "--tasks", str(c.file("task.jsonl", BINARY)))),
    (
        "eval-tasks-malformed-line",
        lambda c: eval_(
            c, "--tasks", str(c.file("task.jsonl", '{"query": "a", "choices": ["x", "y"], "gold": 0}\n{"query": '))
        ),
    ),
    (
        "eval-tasks-gold-out-of-range",
        lambda c: eval_(c, "--tasks", str(c.file("task.jsonl", '{"query": "a", "choices": ["x", "y"], "gold": 2}\n'))),
    ),
    ("eval-tasks-hub-name-offline", lambda c: eval_(c, "--tasks", "hellaswag")),
    (
        "eval-tasks-on-onnx",
        lambda c: eval_(
            c,
            "--tasks",
            str(c.file("task.jsonl", '{"query": "a", "choices": ["x", "y"], "gold": 0}\n')),
            model=onnx_model(c),
        ),
    ),
    # numbers
    ("prune-seed-huge", lambda c: prune(c, "--seed", str(2**70))),
    ("recover-seed-huge", lambda c: recover(c, "--seed", str(2**70))),
    ("prune-per-layer-non-numeric", lambda c: prune(c, "--per-layer", str(c.file("rates.json", '["a", "b"]')))),
    ("prune-per-layer-null", lambda c: prune(c, "--per-layer", str(c.file("rates.json", "[0.5, null]")))),
    ("prune-per-layer-binary", lambda c: prune(c, "--per-layer", str(c.file("rates.json", BINARY)))),
    (
        "prune-per-layer-manifest-without-rates",
        lambda c: prune(c, "--per-layer", str(c.file("m.json", '{"per_block_rates": "x"}'))),
    ),
    ("prune-per-layer-nan", lambda c: prune(c, "--per-layer", str(c.file("rates.json", "[NaN, 0.5]")))),
    ("prune-per-layer-a-folder", lambda c: prune(c, "--per-layer", str(c.inp))),
    # output paths, found before any work
    ("prune-out-in-proc", lambda c: prune(c, out="/proc/losa-x")),
    ("prune-out-under-a-file", lambda c: prune(c, out=regular_file(c) / "out")),
    ("recover-out-in-proc", lambda c: recover(c, out="/proc/losa-x")),
    ("export-out-under-a-file", lambda c: export(c, out=regular_file(c) / "out")),
    ("export-no-safetensors-nor-onnx", lambda c: export(c, "--no-safetensors")),
    ("generate-unknown-kernel", lambda c: ["generate", "--model", str(c.model), "--prompt", "x", "--kernel", "fp16"]),
    ("generate-top-p-zero", lambda c: ["generate", "--model", str(c.model), "--prompt", "x", "--top-p", "0"]),
    ("inspect-plot-in-proc", lambda c: ["inspect", str(c.model), "--plot", "/proc/losa-x.png"]),
    ("inspect-plot-under-a-file", lambda c: ["inspect", str(c.model), "--plot", str(regular_file(c) / "x.png")]),
    ("bench-report-in-proc", lambda c: bench(c, onnx_model(c), "--report", "/proc/losa-x.png")),
    ("bench-report-under-a-file", lambda c: bench(c, onnx_model(c), "--report", str(regular_file(c) / "x.png"))),
    ("run-out-in-proc", lambda c: run(c, out="/proc/losa-x")),
    ("run-out-inside-input", lambda c: run(c, out=c.model / "run")),
    ("prune-out-inside-input", lambda c: prune(c, out=c.model / "pruned")),
    ("export-out-inside-input", lambda c: export(c, out=c.model / "exported")),
    ("recover-out-inside-input", lambda c: recover(c, out=c.model / "recovered")),
    ("prune-out-is-a-file", lambda c: prune(c, "--force", out=regular_file(c))),
    # recipes
    ("run-recipe-binary", lambda c: recipe(c, BINARY)),
    ("run-recipe-bad-yaml", lambda c: recipe(c, "prune: [")),
    ("run-recipe-a-list", lambda c: recipe(c, "- 1\n- 2\n")),
    # hub names without network
    ("prune-hub-model-offline", lambda c: prune(c, model="nobody/no-such-model")),
    ("prune-calib-c4-offline", lambda c: prune(c, "--calib", "c4", calib=False)),
    ("eval-data-wikitext2-offline", lambda c: eval_(c, "--data", "wikitext2")),
    ("prune-default-calib", lambda c: prune(c, calib=False)),
    ("recover-default-calib", lambda c: [a for a in recover(c) if a not in ("--calib", str(c.calib))]),
]
if not torch.cuda.is_available():
    CASES += [
        ("recover-device-cuda-without-gpu", lambda c: recover(c, "--device", "cuda")),
        ("prune-device-cuda-without-gpu", lambda c: prune(c, "--device", "cuda")),
    ]


def tree_digest(*folders: Path) -> str:
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            digest.update(str(path.relative_to(folder)).encode())
            if path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def no_network(connections, monkeypatch):
    """The network blocked, and the Hub libraries told they are offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_nothing_written(case: Case, shared, tmp_path, no_network, monkeypatch):
    assert_one_line_nothing_written(case, shared, tmp_path, monkeypatch)


def assert_one_line_nothing_written(case: Case, shared: tuple[Path, Path], tmp_path: Path, monkeypatch) -> str:
    """Run one case: one ``error:`` line of bounded length, a non-zero exit (not CliRunner's 1), inputs unchanged,
    nothing written; returns the line (other test modules with more cases call this too)."""
    model, calib = shared
    ctx = Ctx(model=model, calib=calib, inp=tmp_path / "in", out=tmp_path / "out")
    ctx.inp.mkdir()
    monkeypatch.chdir(tmp_path)  # a recipe's relative paths, and anything written by mistake, stay here
    args = case[1](ctx)
    before = tree_digest(model, ctx.inp)
    result = runner.invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # exit code 1 is CliRunner's for an exception that escaped the CLI
    assert result.exit_code not in (0, 1), (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert len(lines[0]) <= MAX_LINE, f"a {len(lines[0]):,}-character error line: {lines[0][:300]}..."
    assert tree_digest(model, ctx.inp) == before, "an input was modified"
    written = [p.name for p in tmp_path.iterdir() if p.name != "in"]
    assert written == [], f"written: {written}"
    return lines[0]


# --- offline: local paths never touch the network; Hub names fail fast -----------------------


@pytest.mark.parametrize("hub_offline", ["1", None], ids=["HF_HUB_OFFLINE", "no-offline-variable"])
def test_local_paths_never_touch_the_network(hub_offline, shared, tmp_path, connections, monkeypatch):
    model, calib = shared
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    if hub_offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", hub_offline)
    base = ["--model", str(model), "--nsamples", "2", "--seqlen", "16"]
    pruned = runner.invoke(app, ["prune", "--out", str(tmp_path / "w"), "--calib", str(calib)] + base)
    assert pruned.exit_code == 0, pruned.output
    evaluated = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tmp_path / "w"),
            "--data",
            str(calib),
            "--seqlen",
            "16",
            "--max-windows",
            "2",
            "--sparsity",
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    default = runner.invoke(app, ["prune", "--out", str(tmp_path / "d")] + base)  # no --calib: no Hub either
    assert default.exit_code == 2 and "--calib is required" in default.stderr
    assert connections == []


@pytest.mark.parametrize(
    "args",
    [
        ["prune", "--model", "nobody/no-such-model", "--calib", "{calib}", "--out", "{out}"],
        ["prune", "--model", "{model}", "--calib", "c4", "--nsamples", "2", "--out", "{out}"],
        ["eval", "--model", "{model}", "--data", "wikitext2"],
    ],
    ids=["hub-model", "hub-calib", "hub-eval-data"],
)
def test_hub_names_fail_fast_without_network(args, shared, tmp_path, connections, monkeypatch):
    model, calib = shared
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    result = runner.invoke(app, [a.format(model=model, calib=calib, out=tmp_path / "out") for a in args])
    # fails fast: one probe of the Hub, no retries by the Hub libraries (no wall-clock bound in tests)
    assert len(connections) == 1, connections
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "cannot be reached" in lines[0], result.output
    assert "a model folder" in lines[0] or "a local .txt/.jsonl file" in lines[0]
    assert not (tmp_path / "out").exists()


def test_per_layer_replays_a_losa_manifest(shared, tmp_path):
    """``--per-layer`` takes a losa manifest, or the folder holding it, as its help says."""
    model, _ = shared
    (tmp_path / "rates.json").write_text("[0.25, 0.75]")
    first = runner.invoke(
        app,
        [
            "prune",
            "--model",
            str(model),
            "--out",
            str(tmp_path / "a"),
            "--method",
            "magnitude",
            "--per-layer",
            str(tmp_path / "rates.json"),
        ],
    )
    assert first.exit_code == 0, first.output
    for given in (tmp_path / "a" / "losa_manifest.json", tmp_path / "a"):
        out = tmp_path / f"replay-{given.name}"
        result = runner.invoke(
            app,
            [
                "prune",
                "--model",
                str(model),
                "--out",
                str(out),
                "--method",
                "magnitude",
                "--per-layer",
                str(given),
                "--json",
            ],
        )
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["per_block_rates"] == [0.25, 0.75]
