"""``losa prune --low-memory``: one block in memory at a time, same output as the in-memory path."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import build_tiny_model, folder_digest
from losa_cli.cli import app
from losa_cli.core.config import CalibrationConfig
from losa_cli.prune import PruneConfig
from losa_cli.prune.workflow import run_prune

REPO = Path(__file__).resolve().parents[1]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _prune(model: Path, out: Path, calib: Path, low_memory: bool, **settings) -> object:
    config = PruneConfig(model=str(model), out=str(out), low_memory=low_memory, force=True,
                         calibration=CalibrationConfig(calib=str(calib), nsamples=4, seqlen=32), **settings)
    return run_prune(config)


@pytest.mark.parametrize(("kind", "settings"), [
    ("llama6", {"method": "wanda", "sparsity": 0.6}),
    ("llama6", {"method": "sparsegpt", "sparsity": 0.6, "allocation": "rmi"}),
    ("llama6", {"method": "magnitude", "sparsity": 0.5}),
    ("llama6", {"method": "wanda", "pattern": "2:4"}),
    ("gemma3_text", {"method": "wanda", "sparsity": 0.5, "allocation": "owl", "owl_lambda": 0.05}),
    ("opt", {"method": "sparsegpt", "sparsity": 0.5}),
])
def test_low_memory_equals_in_memory_bit_for_bit(kind, settings, tiny_models, tiny_llama_6, calib_file, tmp_path):
    model = tiny_llama_6 if kind == "llama6" else tiny_models[kind]
    before = folder_digest(model)
    in_memory = _prune(model, tmp_path / "in-memory", calib_file, low_memory=False, **settings)
    streamed = _prune(model, tmp_path / "streamed", calib_file, low_memory=True, **settings)
    assert folder_digest(model) == before, "the input model was modified"
    assert streamed.low_memory and not in_memory.low_memory
    assert streamed.mask_checksum == in_memory.mask_checksum
    assert streamed.per_layer_sparsity == in_memory.per_layer_sparsity
    assert streamed.per_block_rates == in_memory.per_block_rates
    expected, written = _tensors(tmp_path / "in-memory"), _tensors(tmp_path / "streamed")
    assert set(written) == set(expected)
    assert all(torch.equal(written[name], expected[name]) for name in expected)
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    config = lambda folder: json.loads((folder / "config.json").read_text())  # noqa: E731
    assert config(tmp_path / "streamed") == config(tmp_path / "in-memory")


@pytest.mark.parametrize(("kind", "settings"), [
    ("llama6", {"method": "sparsegpt", "sparsity": 0.6, "allocation": "rmi"}),
    ("gemma3_text", {"method": "wanda", "sparsity": 0.5, "allocation": "owl", "owl_lambda": 0.05}),
])
def test_activations_on_disk_give_the_same_model(kind, settings, tiny_models, tiny_llama_6, calib_file, tmp_path,
                                                 monkeypatch):
    from losa_cli.core.activations import DiskWindows

    written = []
    original = DiskWindows.append
    monkeypatch.setattr(DiskWindows, "append", lambda self, t: (written.append(self.generation), original(self, t)))
    model = tiny_llama_6 if kind == "llama6" else tiny_models[kind]
    reference = _prune(
        model, tmp_path / "in-memory", calib_file, low_memory=False, activations_on_disk=False, **settings
    )
    assert not written and not reference.activations_on_disk
    on_disk = _prune(model, tmp_path / "on-disk", calib_file, low_memory=True, activations_on_disk=True, **settings)
    # every block's inputs went through files (the last block's outputs, which nothing reads, are not computed)
    blocks = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
    assert on_disk.activations_on_disk and max(written) == blocks - 1
    assert on_disk.mask_checksum == reference.mask_checksum
    expected, got = _tensors(tmp_path / "in-memory"), _tensors(tmp_path / "on-disk")
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in-memory", "on-disk"]  # the activation files are gone


def test_low_memory_output_loads_and_prunes_again(tiny_llama_6, calib_file, tmp_path):
    """The sharded output is an ordinary checkpoint: losa (and transformers) load it, and pruning
    it again streamed keeps every zero."""
    first = _prune(tiny_llama_6, tmp_path / "a", calib_file, low_memory=True, method="wanda", sparsity=0.5)
    second = _prune(tmp_path / "a", tmp_path / "b", calib_file, low_memory=True, method="wanda", sparsity=0.7)
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    pruned = [name for name in a if name.endswith("proj.weight")]
    assert pruned and all(bool((b[name][a[name] == 0] == 0).all()) for name in pruned)
    assert second.global_sparsity == pytest.approx(0.7, abs=0.01) and first.global_sparsity == pytest.approx(
        0.5, abs=0.01
    )


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from losa_cli.core.config import CalibrationConfig
    from losa_cli.prune import PruneConfig
    from losa_cli.prune.workflow import run_prune

    def status_mib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024

    def prune(model, out):
        run_prune(PruneConfig(model=model, out=out, method="wanda", sparsity=0.5, low_memory={low_memory}, force=True,
                              calibration=CalibrationConfig(calib={calib!r}, nsamples=2, seqlen=32)))

    prune({warmup!r}, {out!r})  # imports and first-call caches: the baseline includes them
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM (ru_maxrss would also carry the forking pytest's peak)
    baseline = status_mib("VmRSS")
    prune({model!r}, {out!r})
    peak = status_mib("VmHWM")
    print(json.dumps({{"baseline": baseline, "peak": peak}}))
""")


def _block_model(folder: Path) -> tuple[Path, int, int]:
    """A Llama of 16 blocks of 16.8 MB each (fp32), with a small vocabulary: the model is many
    times one block, so a peak that follows the model size cannot pass for one block."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import tiny_tokenizer

    tokenizer = tiny_tokenizer(add_bos=False)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    block_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    return folder, block_bytes, model_bytes


def _peak(model: Path, warmup: Path, out: Path, calib: Path, low_memory: bool) -> float:
    script = PEAK_SCRIPT.format(
        tests=str(REPO / "tests"),
        model=str(model),
        warmup=str(warmup),
        out=str(out),
        calib=str(calib),
        low_memory=low_memory,
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return (measured["peak"] - measured["baseline"]) * 2**20


def test_low_memory_peak_follows_one_block_not_the_model(tiny_models, calib_file, tmp_path):
    model, block_bytes, model_bytes = _block_model(tmp_path / "model")
    assert model_bytes > 14 * block_bytes
    warmup = tiny_models["llama"]
    streamed = _peak(model, warmup, tmp_path / "streamed", calib_file, low_memory=True)
    in_memory = _peak(model, warmup, tmp_path / "in-memory", calib_file, low_memory=False)
    # measured: about 4 blocks (the block, its serialised copy while written, the pruning scores
    # and masks); the model is 16 blocks
    assert streamed < 6 * block_bytes, (streamed / 2**20, block_bytes / 2**20)
    assert in_memory > model_bytes, "the measurement cannot tell the two paths apart"


def test_low_memory_refusals_are_one_line(tiny_llama_6, calib_file, tmp_path):
    runner = CliRunner()
    head = runner.invoke(
        app,
        [
            "prune",
            "--model",
            str(tiny_llama_6),
            "--out",
            str(tmp_path / "o"),
            "--low-memory",
            "--prune-lm-head",
            "--calib",
            str(calib_file),
        ],
    )
    assert head.exit_code != 0 and "--prune-lm-head needs the whole model in memory" in head.output
    assert "Traceback" not in head.output
    build_tiny_model(tmp_path / "bin", "llama")
    for file in (tmp_path / "bin").glob("*.safetensors"):
        file.unlink()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"pickle")
    no_safetensors = runner.invoke(
        app,
        [
            "prune",
            "--model",
            str(tmp_path / "bin"),
            "--out",
            str(tmp_path / "p"),
            "--low-memory",
            "--calib",
            str(calib_file),
        ],
    )
    assert (
        no_safetensors.exit_code != 0 and "--low-memory reads a local folder of .safetensors" in no_safetensors.output
    )
    build_tiny_model(tmp_path / "corrupt", "llama")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\xff" * 64)
    corrupt = runner.invoke(
        app,
        [
            "prune",
            "--model",
            str(tmp_path / "corrupt"),
            "--out",
            str(tmp_path / "q"),
            "--low-memory",
            "--calib",
            str(calib_file),
        ],
    )
    assert corrupt.exit_code != 0 and "corrupt or incomplete checkpoint" in corrupt.output
    assert "Traceback" not in corrupt.output and not (tmp_path / "q").exists()
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()
