"""The decode graph of sliding-window models: Gemma 3 (hybrid: sliding and full layers) and Mistral.

The tiny Gemma 3 has ``sliding_window=8``, so every check here runs past position 8, where a graph
that ignored the window (or cropped the past wrongly) would give other logits than transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export_bench import export_onnx, magnitude_prune
from typer.testing import CliRunner

from conftest import tiny_config, tiny_tokenizer
from losa_cli.cli import app
from losa_cli.core.errors import NumericalError
from losa_cli.core.modeling import load_model
from losa_cli.export import onnx_graphs
from losa_cli.export.verify import verify_export, window_not_reached
from losa_cli.runtime import GraphSpec, kv_names, onnx_greedy, ort_session, read_graph_spec

runner = CliRunner()
WINDOW = 8  # conftest.tiny_config's Gemma 3


@pytest.fixture(scope="module")
def pruned_gemma(tiny_models, tmp_path_factory) -> Path:
    return magnitude_prune(tiny_models["gemma3_text"], tmp_path_factory.mktemp("pruned") / "gemma50", 0.5)


@pytest.fixture(scope="module")
def exported_gemma(pruned_gemma, tmp_path_factory) -> tuple[Path, dict]:
    return export_onnx(pruned_gemma, tmp_path_factory.mktemp("export") / "gemma50-onnx")


def test_gemma_exports_both_graphs_verified_past_the_window(exported_gemma):
    out, report = exported_gemma
    graphs, check = report["onnx"]["graphs"], report["onnx"]["verification"]
    assert graphs["decode"] == "decode.onnx" and graphs["sliding_window"] == WINDOW
    assert read_graph_spec(out / "onnx").sliding_window == WINDOW
    assert check["prefill_max_abs_diff"] < 1e-4 and check["decode_max_abs_diff"] < 1e-4
    assert check["greedy_match"] is True and check["zero_mismatches"] == []
    assert check["weights_checked"] == 15  # 14 block linears + the head, tied to the embedding and its zero pad row
    assert report["warnings"] == [] and "gemma3_text" in onnx_graphs.DECODE_TESTED_MODEL_TYPES


def _hybrid_cache_logits(model, ids: torch.Tensor, new: torch.Tensor) -> tuple[np.ndarray, list[int]]:
    """The next token's logits through transformers' own (hybrid, cropping) cache, and each layer's cached length."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=ids, use_cache=True, cache=cache)
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    step = model(input_ids=new, attention_mask=torch.ones(ids.shape[0], ids.shape[1] + 1, dtype=torch.long),
                 use_cache=True, cache=cache)
    return step.logits[:, -1:].numpy(), lengths


@torch.no_grad()
def test_decode_logits_past_the_window_equal_transformers_hybrid_cache(pruned_gemma, exported_gemma):
    out, _ = exported_gemma
    model = load_model(str(pruned_gemma)).model
    prefill, decode = ort_session(out / "onnx" / "prefill.onnx"), ort_session(out / "onnx" / "decode.onnx")
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(3, model.config.vocab_size, (2, 13), generator=generator)
    new = torch.randint(3, model.config.vocab_size, (2, 1), generator=generator)
    outputs = prefill.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 13), dtype=np.int64)})
    assert [p.shape[2] for p in outputs[1:]] == [13] * 4  # the sliding layer's past is whole too
    feed = {"input_ids": new.numpy(), "attention_mask": np.ones((2, 14), dtype=np.int64),
            **dict(zip(kv_names(2, "past_key_values"), outputs[1:]))}
    step = decode.run(None, feed)[0]
    expected, lengths = _hybrid_cache_logits(model, ids, new)
    assert lengths == [WINDOW - 1, 13]  # transformers really cropped its sliding layer
    assert np.abs(step - expected).max() < 1e-4
    longer = torch.cat([ids, new], dim=1)
    assert np.abs(step - model(input_ids=longer).logits[:, -1:].numpy()).max() < 1e-4
    # greedy through prefill + decode equals transformers' generate (its hybrid cache), across the window
    prompt = ids[:, :5]
    tokens = onnx_greedy(prefill, decode, prompt.numpy(), 10, 2)
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, min_new_tokens=10,
                               do_sample=False, pad_token_id=0)[:, 5:]
    assert tokens.tolist() == generated.tolist()


def _drop_decode_sliding_mask(monkeypatch) -> None:
    """Mutation: the decode graph is traced with a plain causal mask on its sliding layers."""
    from transformers import masking_utils

    traced = onnx_graphs.DecodeGraph.forward

    def forward(self, *args):
        with monkeypatch.context() as patch:
            patch.setattr(masking_utils, "sliding_window_causal_mask_function",
                          lambda window: masking_utils.causal_mask_function)
            return traced(self, *args)

    monkeypatch.setattr(onnx_graphs.DecodeGraph, "forward", forward)


def _tiny_model(model_type: str, **settings):
    """A tiny model of ``model_type`` in memory, its config changed by ``settings``."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, len(tiny_tokenizer(add_bos=False)))
    for name, value in settings.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def test_verification_catches_a_decode_graph_without_the_sliding_mask(tmp_path, monkeypatch):
    window = 16  # longer than the prompts verification used before it read the window
    model = _tiny_model("gemma3_text", sliding_window=window)
    _drop_decode_sliding_mask(monkeypatch)
    spec, _ = onnx_graphs.export_graphs(model, tmp_path)
    with pytest.raises(NumericalError, match="ONNX logits differ"):
        verify_export(model, tmp_path, spec, 1e-4)
    # inside the window the broken graph is right: only a position past it shows the mutation
    prefill, decode = ort_session(tmp_path / spec.prefill), ort_session(tmp_path / spec.decode)
    ids = torch.randint(3, model.config.vocab_size, (1, window + 4), generator=torch.Generator().manual_seed(2))
    reference = model(input_ids=ids).logits.numpy()
    diffs = []
    for length in (window - 2, window + 3):
        past = prefill.run(None, {"input_ids": ids[:, :length].numpy(),
                                  "attention_mask": np.ones((1, length), dtype=np.int64)})[1:]
        step = decode.run(None, {"input_ids": ids[:, length:length + 1].numpy(),
                                 "attention_mask": np.ones((1, length + 1), dtype=np.int64),
                                 **dict(zip(kv_names(2, "past_key_values"), past))})[0]
        diffs.append(float(np.abs(step[:, -1] - reference[:, length]).max()))
    assert diffs[0] < 1e-4 and diffs[1] > 1e-3


def test_bench_times_the_gemma_decode_phase(exported_gemma):
    out, _ = exported_gemma
    result = runner.invoke(app, ["bench", "--cpu", str(out), "--engines", "onnxruntime", "--iterations", "1",
                                 "--warmup", "0", "--seqlen", str(WINDOW + 4), "--decode-tokens", "2", "--threads", "1",
                                 "--json"])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)["runs"]
    decode = [r for r in runs if r["phase"] == "decode"]
    assert {r["model"] for r in decode} == {"sparse", "dense"}
    assert all(r["error"] is None and r["timing"]["median_ms"] > 0 for r in decode)


def test_mistral_with_a_sliding_window_exports_a_verified_decode_graph(tmp_path):
    model = _tiny_model("mistral", sliding_window=4)
    spec, warnings = onnx_graphs.export_graphs(model, tmp_path)
    assert warnings == [] and spec.decode == "decode.onnx" and spec.sliding_window == 4
    check = verify_export(model, tmp_path, spec, 1e-4)
    assert check.decode_max_abs_diff < 1e-4 and check.greedy_match is True


def test_chunked_attention_gets_no_decode_graph(tmp_path):
    """A chunked-attention cache (Llama 4) looks like a sliding one to transformers' cache, but is refused."""
    model = _tiny_model("llama", attention_chunk_size=4)
    reason = onnx_graphs.decode_support(model)
    assert reason is not None and "chunked-attention" in reason and "gemma3_text" in reason
    spec, warnings = onnx_graphs.export_graphs(model, tmp_path)
    assert spec.decode is None and warnings == [f"no decode graph: {reason}"]


def test_a_fixed_seqlen_inside_the_window_is_reported():
    spec = GraphSpec("prefill.onnx", "decode.onnx", 2, 2, 8, 320, 1, 4, 17, True, "gemma3_text", sliding_window=WINDOW)
    assert "only within the sliding window (8 positions)" in window_not_reached(spec, 4)
    assert window_not_reached(GraphSpec(**{**spec.to_dict(), "seqlen": 6}), 4) is None  # reaches position 8
    assert window_not_reached(GraphSpec(**{**spec.to_dict(), "seqlen": None}), 4) is None
    assert window_not_reached(GraphSpec(**{**spec.to_dict(), "sliding_window": None}), 4) is None
