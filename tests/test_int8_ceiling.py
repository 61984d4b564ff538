"""int8 ONNX graphs, perplexity of ONNX graphs, and the decode bandwidth ceiling, on tiny models.

int8 must keep every pruned weight exactly zero and stay close to the fp32 graph; the
per-token form must compute exactly the quantization it claims (checked against numpy); the
byte counts of the ceiling are checked on a graph built by hand; perplexity through ONNX
Runtime must equal the PyTorch number on the fp32 graph.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_export_bench import magnitude_prune
from typer.testing import CliRunner

from conftest import bench
from losa_cli.cli import app
from losa_cli.core.errors import ConfigError
from losa_cli.export import ExportConfig
from losa_cli.export.int8 import quantize_graph, quantize_weight
from losa_cli.runtime import BenchConfig, EvalConfig, ort_session
from losa_cli.runtime.ceiling import decode_bytes
from losa_cli.runtime.evaluate import run_eval

runner = CliRunner()
HAS_DEEPSPARSE = importlib.util.find_spec("deepsparse") is not None


@pytest.fixture(scope="module")
def int8_export(tiny_models, tmp_path_factory) -> tuple[Path, dict]:
    """A 60%-pruned tiny Llama exported with --onnx --int8 through the CLI."""
    work = tmp_path_factory.mktemp("int8")
    pruned = magnitude_prune(tiny_models["llama"], work / "pruned", 0.6)
    out = work / "export"
    result = runner.invoke(app, ["export", str(pruned), "--out", str(out), "--onnx", "--int8", "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def _matmul_graph(weight: np.ndarray, path: Path) -> Path:
    """y = x @ weight, with x of shape [batch, tokens, K]."""
    k, n = weight.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", n])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_quantize_weight_keeps_zeros_and_rounds_to_half_a_step():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 24)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.7] = 0
    weight[:, 3] = 0  # an all-zero output channel
    quantized, scale = quantize_weight(weight)
    assert quantized.dtype == np.int8 and scale.shape == (24,)
    assert np.all(quantized[weight == 0] == 0) and np.all(quantized[:, 3] == 0)
    assert np.abs(quantized.astype(np.float32) * scale - weight).max() <= scale.max() / 2 + 1e-7
    assert np.abs(quantized).max() == 127


def test_per_token_graph_computes_exactly_its_quantization(tmp_path):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((40, 12)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.6] = 0
    x = rng.standard_normal((2, 5, 40)).astype(np.float32) * np.array([1.0, 30.0, 0.01, 3.0, 1.0])[
        None, :, None
    ].astype(np.float32)
    report = quantize_graph(_matmul_graph(weight, tmp_path / "f.onnx"), tmp_path / "q.onnx", "token")
    assert report.matmuls_quantized == 1 and report.zeros_kept
    got = ort_session(tmp_path / "q.onnx").run(None, {"x": x})[0]
    q_weight, w_scale = quantize_weight(weight)
    x_scale = np.abs(x).max(-1, keepdims=True) / 127
    q_x = np.rint(x / x_scale)
    expected = (q_x @ q_weight.astype(np.float64)) * x_scale * w_scale
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(got - x @ weight).max() < 0.05 * np.abs(x @ weight).max()  # and it is close to fp32


def test_int8_export_keeps_every_zero_and_tracks_fp32(int8_export):
    out, report = int8_export
    int8 = report["onnx_int8"]
    assert int8["folder"] == "onnx-int8" and int8["comparison"]["top1_agreement"] >= 0.9
    assert int8["comparison"]["prefill_max_abs_diff"] <= 0.05 * int8["comparison"]["logits_max_abs"]
    assert int8["comparison"]["greedy_agreement"] >= 0.75
    fp32 = onnx.load(str(out / "onnx" / "prefill.onnx"))
    fp32_weights = {init.name: numpy_helper.to_array(init) for init in fp32.graph.initializer}
    quantized = onnx.load(str(out / "onnx-int8" / "prefill.onnx"))
    arrays = {init.name: numpy_helper.to_array(init) for init in quantized.graph.initializer}
    checked = 0
    for node in quantized.graph.node:
        if node.op_type != "MatMulInteger" or node.input[1] not in arrays:
            continue
        stored, zero_point = arrays[node.input[1]], arrays[node.input[3]]
        original = fp32_weights[node.input[1].removesuffix("_int8")]
        assert stored.dtype == np.uint8 and np.all(zero_point == 128)
        assert np.all(stored[original == 0] == 128), node.input[1]  # every pruned weight is still exactly zero
        checked += 1
    assert checked >= 15  # 7 linears x 2 blocks + the head
    assert all(g["zeros_kept"] for g in int8["graphs"].values())


def test_onnx_perplexity_equals_pytorch_and_int8_is_close(int8_export, eval_file):
    out, _ = int8_export
    settings = dict(data=str(eval_file), seqlen=32, max_windows=4)
    torch_ppl = run_eval(EvalConfig(model=str(out), **settings)).perplexity.perplexity
    onnx_ppl = run_eval(EvalConfig(model=str(out / "onnx"), **settings)).perplexity
    int8_ppl = run_eval(EvalConfig(model=str(out / "onnx-int8"), **settings)).perplexity.perplexity
    assert onnx_ppl.device.startswith("cpu (onnxruntime)")
    assert abs(onnx_ppl.perplexity / torch_ppl - 1) < 1e-4
    assert int8_ppl != onnx_ppl.perplexity and abs(int8_ppl / torch_ppl - 1) < 0.05
    with pytest.raises(ConfigError, match="perplexity only"):
        run_eval(EvalConfig(model=str(out / "onnx"), sparsity=True))
    with pytest.raises(ConfigError, match="drop --dtype and --device"):
        run_eval(EvalConfig(model=str(out / "onnx"), dtype="bfloat16", **settings))


def test_onnx_eval_without_a_tokenizer_says_what_to_give(int8_export, eval_file, tmp_path):
    out, _ = int8_export
    lonely = tmp_path / "graphs" / "prefill.onnx"
    lonely.parent.mkdir()
    lonely.write_bytes((out / "onnx" / "prefill.onnx").read_bytes())
    (lonely.parent / "weights.data").write_bytes((out / "onnx" / "weights.data").read_bytes())
    result = runner.invoke(app, ["eval", "--model", str(lonely), "--data", str(eval_file), "--seqlen", "32"])
    assert result.exit_code != 0 and "give --tokenizer MODEL_DIR" in result.output
    assert "Traceback" not in result.output
    ppl = run_eval(EvalConfig(model=str(lonely), tokenizer=str(out), data=str(eval_file), seqlen=32, max_windows=2))
    assert ppl.perplexity.windows == 2


def test_decode_bytes_counts_a_hand_built_graph(tmp_path):
    rng = np.random.default_rng(2)
    dense = rng.standard_normal((16, 8)).astype(np.float32)
    dense[:, :2] = 0  # 32 zeros of 128
    path = _matmul_graph(dense, tmp_path / "f.onnx")
    counted = decode_bytes(path, past_tokens=10, num_layers=3, kv_heads=2, head_dim=4)
    kv = 2 * 3 * 2 * 4 * 10 * 4
    assert (counted.weight_elements, counted.weight_zeros, counted.kv_cache) == (128, 32, kv)
    assert counted.total("dense") == 128 * 4 + kv
    assert counted.total("bitmask") == 96 * 4 + 16 + kv and counted.total("auto") == counted.total("bitmask")
    dense_only = decode_bytes(_matmul_graph(np.ones((16, 8), np.float32), tmp_path / "d.onnx"), 10, 3, 2, 4)
    assert dense_only.total("bitmask") == 128 * 4 + 16 + kv and dense_only.total("auto") == dense_only.total("dense")
    quantize_graph(path, tmp_path / "q.onnx", "token")
    counted = decode_bytes(tmp_path / "q.onnx", past_tokens=10, num_layers=3, kv_heads=2, head_dim=4)
    assert (counted.weight_elements, counted.weight_zeros, counted.bytes_per_value) == (128, 32, 1)
    assert counted.total("dense") == 128 + 8 * 4 + kv and counted.total("bitmask") == 96 + 16 + 8 * 4 + kv


def test_export_int8_needs_onnx():
    with pytest.raises(ConfigError, match="--int8 quantizes the ONNX graphs"):
        ExportConfig(model="m", out="o", int8=True)
    with pytest.raises(ConfigError, match="--precisions"):
        BenchConfig(model="m", precisions="int4")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.skipif(not HAS_DEEPSPARSE, reason="DeepSparse is not installed (pip install 'losa[deepsparse]')")
def test_bench_int8_on_both_engines_leaves_the_export_untouched(int8_export):
    out, _ = int8_export
    before = _digest(out / "onnx")
    report = bench(
        BenchConfig(
            model=str(out),
            engines="onnxruntime,deepsparse",
            precisions="fp32,int8",
            seqlen=32,
            decode_tokens=2,
            iterations=1,
            warmup=0,
            threads=1,
        )
    ).to_dict()
    assert _digest(out / "onnx") == before  # DeepSparse rewrites the shapes of the file it is given
    seen = {(r["engine"], r["model"], r["precision"], r["phase"]) for r in report["runs"] if r["error"] is None}
    assert seen == {
        (e, m, p, ph)
        for e in ("onnxruntime", "deepsparse")
        for m in ("sparse", "dense")
        for p in ("fp32", "int8")
        for ph in ("prefill", "decode")
    }
    int8_decode = [r for r in report["runs"] if r["precision"] == "int8" and r["phase"] == "decode"]
    assert all(r["ceiling"]["bytes"]["bytes_per_value"] == 1 for r in int8_decode)


def test_recipe_overrides_turn_on_int8(monkeypatch):
    from losa_cli.run import load_recipe

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the recipe's data paths are relative to the repository
    recipe, _ = load_recipe("examples/default.yaml", ["export.int8=true", "bench.precisions=fp32,int8"])
    assert recipe.section("export")["int8"] is True and recipe.section("bench")["precisions"] == "fp32,int8"
    with pytest.raises(ConfigError, match="precisions 'int4': choose from fp32, bf16, int8"):
        load_recipe("examples/default.yaml", ["bench.precisions=int4"])
