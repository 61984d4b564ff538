"""``--prune-lm-head``: prune, recover and export agree on a pruned output head.

On a tied model the head becomes its own (pruned) copy and the embedding stays intact;
recovery keeps the head's zeros; the ONNX export finds them in the graph; int8 keeps them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_config, tiny_tokenizer
from losa_cli.cli import app
from losa_cli.core.config import CalibrationConfig
from losa_cli.core.modeling import load_model
from losa_cli.recover import RecoverConfig
from losa_cli.recover.workflow import run_recover

runner = CliRunner()


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory) -> Path:
    """A tiny Llama whose output head shares the embedding matrix (as SmolLM2's does)."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tied") / "llama"
    tokenizer = tiny_tokenizer(add_bos=False)
    config = tiny_config("llama", len(tokenizer))
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def head_pruned(tied_llama, calib_file, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prune") / "head"
    result = runner.invoke(app, ["prune", "--model", str(tied_llama), "--out", str(out), "--calib", str(calib_file),
                                 "--nsamples", "4", "--seqlen", "32", "--sparsity", "0.5", "--prune-lm-head", "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_prune_lm_head_unties_and_prunes_only_the_copy(tied_llama, head_pruned):
    out, report = head_pruned
    assert report["lm_head"]["untied_from_embedding"] is True and report["lm_head"]["sparsity"] == pytest.approx(
        0.5, abs=0.01
    )
    original = load_model(str(tied_llama)).model.get_input_embeddings().weight
    model = load_model(str(out)).model
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is not embedding and not model.config.tie_word_embeddings
    assert torch.equal(embedding, original)  # the embedding is intact
    assert float((head == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert torch.equal(head[head != 0], original[head != 0])  # Wanda only zeroes


def test_recover_keeps_the_head_zeros_and_export_checks_them(head_pruned, calib_file, tmp_path):
    out, _ = head_pruned
    head_mask = load_model(str(out)).model.get_output_embeddings().weight == 0
    recovered = tmp_path / "recovered"
    run_recover(
        RecoverConfig(
            model=str(out),
            out=str(recovered),
            data=str(calib_file),
            sparsity=0.6,
            stages=1,
            total_steps=2,
            calibration=CalibrationConfig(calib=str(calib_file), nsamples=4, seqlen=32, seed=0),
            error_samples=2,
            rmi_samples=4,
            max_length=32,
            batch_size=2,
            device="cpu",
            rank_max=4,
            mean_ranks=[2.0],
            allocation="uniform",
            rank_allocation="uniform",
        )
    )
    head = load_model(str(recovered)).model.get_output_embeddings().weight
    assert bool((head[head_mask] == 0).all())
    exported = tmp_path / "export"
    result = runner.invoke(app, ["export", str(recovered), "--out", str(exported), "--onnx", "--int8", "--json"])
    assert result.exit_code == 0, result.output
    verification = json.loads(result.stdout)["onnx"]["verification"]
    assert verification["weights_checked"] == 2 * 7 + 1 and not verification["zero_mismatches"]  # blocks + lm_head
