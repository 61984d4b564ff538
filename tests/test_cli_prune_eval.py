"""``losa prune`` and ``losa eval`` end to end on tiny models, through typer's CliRunner."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import folder_digest
from losa_cli.cli import app
from losa_cli.core.modeling import find_blocks, find_linears, load_model
from losa_cli.prune.masks import satisfies_nm

runner = CliRunner()
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt"]




def prune(model, out, *extra, calib=None):
    args = ["prune", "--model", str(model), "--out", str(out), "--nsamples", "4", "--seqlen", "32", "--json"]
    if calib is not None:
        args += ["--calib", str(calib)]
    return runner.invoke(app, args + list(extra))


def pruned_weights(folder):
    model = load_model(str(folder)).model
    return [lin.weight for block in find_blocks(model) for lin in find_linears(block).values()]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_prune_unstructured_every_arch(tiny_models, calib_file, tmp_path, arch, method):
    before = folder_digest(tiny_models[arch])
    result = prune(tiny_models[arch], tmp_path / "out", "--method", method, "--sparsity", "0.5", calib=calib_file)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["global_sparsity"] == pytest.approx(0.5, abs=1e-9)
    for weight in pruned_weights(tmp_path / "out"):
        assert (weight == 0).sum().item() == weight.numel() // 2
        if method == "wanda":
            assert ((weight == 0).sum(dim=1) == weight.shape[1] // 2).all()
    manifest = json.loads((tmp_path / "out" / "losa_manifest.json").read_text())
    assert manifest["settings"]["method"] == method
    assert manifest["results"]["mask_checksum"] == report["mask_checksum"]
    assert "torch" in manifest["versions"] and manifest["results"]["peak_memory_mib"] > 0
    assert manifest["machine"]["torch_threads"] == torch.get_num_threads()  # results depend on it
    assert folder_digest(tiny_models[arch]) == before, "the input model was modified"


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_prune_nm(tiny_models, calib_file, tmp_path, method, pattern):
    result = prune(tiny_models["llama"], tmp_path / "out", "--method", method, "--pattern", pattern, calib=calib_file)
    assert result.exit_code == 0, result.output
    n, m = map(int, pattern.split(":"))
    for weight in pruned_weights(tmp_path / "out"):
        assert satisfies_nm(weight, n, m)
        assert (weight == 0).sum().item() == weight.numel() * n // m


def test_per_layer_rates(tiny_models, calib_file, tmp_path):
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps([0.25, 0.75]))
    result = prune(tiny_models["qwen2"], tmp_path / "out", "--per-layer", str(rates), calib=calib_file)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["per_block_sparsity"] == pytest.approx([0.25, 0.75], abs=1e-3)
    assert report["global_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_pruned_model_loads_with_transformers_and_eval_reports(tiny_models, calib_file, eval_file, tmp_path):
    from transformers import AutoModelForCausalLM

    assert prune(tiny_models["llama"], tmp_path / "out", calib=calib_file).exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.model.layers[0].mlp.up_proj.weight.eq(0).float().mean().item() == pytest.approx(0.5)
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "out"), "--data", str(eval_file), "--seqlen", "16",
                                 "--max-windows", "5", "--sparsity", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    ppl = report["perplexity"]
    assert ppl["windows"] == 5 and ppl["seqlen"] == 16 and ppl["predicted_tokens"] == 75
    assert ppl["bos_per_window"] is False and ppl["dtype"] == "float32"
    assert report["sparsity"]["global_sparsity"] == pytest.approx(0.5)
    assert len(report["sparsity"]["per_layer_sparsity"]) == 14


def test_perplexity_equals_manual_computation_with_bos(tiny_models, eval_file):
    folder = tiny_models["gemma3_text"]
    result = runner.invoke(app, ["eval", "--model", str(folder), "--data", str(eval_file), "--seqlen", "12",
                                 "--max-windows", "3", "--json"])
    assert result.exit_code == 0, result.output
    ppl = json.loads(result.stdout)["perplexity"]
    assert ppl["bos_per_window"] is True
    loaded = load_model(str(folder))
    text = "\n\n".join(d.strip() for d in eval_file.read_text().split("\n\n") if d.strip())
    ids = loaded.tokenizer(text, add_special_tokens=False).input_ids
    nll, count = 0.0, 0
    for w in range(3):
        window = torch.tensor([[loaded.tokenizer.bos_token_id] + ids[w * 11 : (w + 1) * 11]])
        with torch.no_grad():
            logits = loaded.model(window).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += 11
    assert ppl["predicted_tokens"] == count
    assert ppl["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


# --- bad input: one clear line, non-zero exit, nothing written -------------------------------


def assert_clean_error(result, pattern, out=None):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert pattern in result.stderr, result.stderr
    if out is not None:
        assert not out.exists()
        assert not any(p.name.startswith(f".{out.name}.tmp") for p in out.parent.iterdir())


def test_error_missing_model(tmp_path, calib_file):
    assert_clean_error(prune(tmp_path / "nope", tmp_path / "out", calib=calib_file), "does not exist", tmp_path / "out")


def test_error_unsupported_architecture(tmp_path, calib_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import tiny_tokenizer

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=320)).save_pretrained(folder)
    tiny_tokenizer(False).save_pretrained(folder)
    result = prune(folder, tmp_path / "out", calib=calib_file)
    assert_clean_error(result, "unsupported architecture 'gpt2'", tmp_path / "out")
    assert "llama" in result.stderr and "opt" in result.stderr


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_error_sparsity_out_of_range(tiny_models, tmp_path, calib_file, value):
    result = prune(tiny_models["llama"], tmp_path / "out", "--sparsity", value, calib=calib_file)
    assert_clean_error(result, "--sparsity must be in [0, 1)", tmp_path / "out")


@pytest.mark.parametrize(
    "pattern,message",
    [("4:2", "N must be below M"), ("2:2", "N must be below M"), ("x", "is not N:M"), ("2:5", "not a multiple of 5")],
)
def test_error_bad_nm(tiny_models, tmp_path, calib_file, pattern, message):
    result = prune(tiny_models["llama"], tmp_path / "out", "--pattern", pattern, calib=calib_file)
    assert_clean_error(result, message, tmp_path / "out")


def test_error_calibration_too_short(tiny_models, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the model keeps zero weight and the block runs fast\n")
    result = prune(tiny_models["llama"], tmp_path / "out", calib=short)
    assert_clean_error(result, "windows of 32 tokens, fewer than the 4 asked for", tmp_path / "out")


@pytest.mark.parametrize("sampling", ["stream", "document"])
def test_sampling_is_used_and_recorded_in_the_manifest(tiny_models, tmp_path, calib_file, sampling):
    """--sampling picks the calibration windows (different masks) and lands in the manifest."""
    result = prune(tiny_models["llama"], tmp_path / sampling, "--sampling", sampling, calib=calib_file)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / sampling / "losa_manifest.json").read_text())
    assert manifest["settings"]["calibration"]["sampling"] == sampling
    other = "document" if sampling == "stream" else "stream"
    again = prune(tiny_models["llama"], tmp_path / other, "--sampling", other, calib=calib_file)
    assert json.loads(again.stdout)["mask_checksum"] != json.loads(result.stdout)["mask_checksum"]


def test_error_bad_sampling(tiny_models, tmp_path, calib_file):
    result = prune(tiny_models["llama"], tmp_path / "out", "--sampling", "random", calib=calib_file)
    assert_clean_error(result, "--sampling 'random' is unknown; choose one of stream, document", tmp_path / "out")


def test_error_output_exists_then_force(tiny_models, tmp_path, calib_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_clean_error(prune(tiny_models["llama"], out, calib=calib_file), "already exists; pass --force")
    assert (out / "keep.txt").read_text() == "precious"
    result = prune(tiny_models["llama"], out, "--force", calib=calib_file)
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "losa_manifest.json").exists()


def test_error_output_is_the_input(tiny_models, tmp_path, calib_file):
    result = prune(tiny_models["llama"], tiny_models["llama"], "--force", calib=calib_file)
    assert_clean_error(result, "would overwrite the input")


def test_error_sparsegpt_cholesky_names_damping(tiny_models, tmp_path, calib_file, monkeypatch):
    from losa_cli.prune import sparsegpt

    monkeypatch.setattr(sparsegpt.HessianAccumulator, "add", lambda self, x: self.hessian.fill_(float("nan")))
    result = prune(tiny_models["llama"], tmp_path / "out", "--method", "sparsegpt", calib=calib_file)
    assert_clean_error(result, "raise --damp", tmp_path / "out")
    assert result.exit_code == 3


def test_interrupt_leaves_no_output(tiny_models, tmp_path, calib_file, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("losa_cli.prune.workflow.save_model", interrupted)
    result = prune(tiny_models["llama"], tmp_path / "out", calib=calib_file)
    assert_clean_error(result, "interrupted", tmp_path / "out")
    assert result.exit_code == 130


def test_latin1_calibration_and_eval_data_are_read_and_recorded(tiny_models, tmp_path):
    """A Latin-1 file is read (auto: detected and named in a warning; --encoding: as told), and the
    encoding used is recorded beside the data source."""
    from conftest import latin1_news

    news = latin1_news(tmp_path / "news.txt", copies=20)
    result = prune(tiny_models["llama"], tmp_path / "out", calib=news)
    assert result.exit_code == 0, result.output
    assert f"warning: calibration file {news} is not UTF-8; read it as cp1252 (detected)" in " ".join(
        result.stderr.split()
    )
    manifest = json.loads((tmp_path / "out" / "losa_manifest.json").read_text())
    assert manifest["inputs"]["calibration_encoding"] == "cp1252"
    evaluated = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tmp_path / "out"),
            "--data",
            str(news),
            "--encoding",
            "latin-1",
            "--seqlen",
            "16",
            "--max-windows",
            "2",
            "--json",
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["perplexity"]["encoding"] == "iso8859-1"
    assert "warning" not in evaluated.stderr


def test_eval_needs_data_or_sparsity(tiny_models):
    result = runner.invoke(app, ["eval", "--model", str(tiny_models["llama"])])
    assert_clean_error(result, "give --data FILE")


def test_seqlen_clipped_to_context_with_warning(tiny_models, tmp_path):
    big = tmp_path / "big.txt"
    from conftest import synthetic_text

    big.write_text(synthetic_text(200, 200, seed=5))
    result = runner.invoke(
        app,
        [
            "prune",
            "--model",
            str(tiny_models["llama"]),
            "--out",
            str(tmp_path / "o"),
            "--calib",
            str(big),
            "--nsamples",
            "2",
            "--seqlen",
            "4096",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["seqlen"] == 256
    assert "exceeds the model's context 256" in result.stderr


def test_progress_off_a_terminal_is_plain_lines(tiny_models, calib_file, tmp_path):
    """CliRunner is not a terminal: progress comes as plain lines on stderr, never bars."""
    result = runner.invoke(
        app,
        [
            "prune",
            "--model",
            str(tiny_models["llama"]),
            "--out",
            str(tmp_path / "out"),
            "--calib",
            str(calib_file),
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            "--sparsity",
            "0.5",
        ],
    )
    assert result.exit_code == 0, result.output
    blocks = len(find_blocks(load_model(str(tiny_models["llama"])).model))
    assert f"blocks {blocks}/{blocks}" in result.stderr.splitlines(), result.stderr
    assert "\x1b[" not in result.stderr
