"""``losa export --onnx`` and ``losa bench --cpu`` on tiny models.

The export must be exact: ONNX logits equal PyTorch's, the decode graph reproduces
transformers' greedy generation, and every pruned weight keeps its zeros.  Bench timings are
not asserted (they depend on the machine); the JSON must hold every field.
"""

from __future__ import annotations

import importlib.util
import json
import os
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import bench
from losa_cli.cli import app
from losa_cli.core.errors import ConfigError, ModelError, NumericalError
from losa_cli.core.modeling import find_blocks, find_linears, load_model, save_model, sparsity_report
from losa_cli.export import ExportConfig
from losa_cli.export import verify as onnx_verify
from losa_cli.export.workflow import run_export
from losa_cli.runtime import BenchConfig
from losa_cli.runtime import onnx_io as onnx_export
from losa_cli.runtime.engines import summarize

runner = CliRunner()
HAS_DEEPSPARSE = importlib.util.find_spec("deepsparse") is not None


def magnitude_prune(source: Path, target: Path, rate: float) -> Path:
    """Zero the smallest ``rate`` of every block linear weight (a pruned model without calibration)."""
    loaded = load_model(str(source))
    with torch.no_grad():
        for block in find_blocks(loaded.model):
            for linear in find_linears(block).values():
                weight = linear.weight
                threshold = weight.abs().flatten().kthvalue(int(weight.numel() * rate)).values
                weight[weight.abs() <= threshold] = 0
    save_model(loaded, target)
    return target


@pytest.fixture(scope="module")
def pruned_llama(tiny_models, tmp_path_factory) -> Path:
    return magnitude_prune(tiny_models["llama"], tmp_path_factory.mktemp("pruned") / "llama50", 0.5)


@pytest.fixture(scope="module")
def exported(pruned_llama, tmp_path_factory) -> tuple[Path, dict]:
    """The pruned tiny Llama exported through the CLI, with its JSON report."""
    return export_onnx(pruned_llama, tmp_path_factory.mktemp("export") / "llama50-onnx")


def export_onnx(model: Path, out: Path) -> tuple[Path, dict]:
    """``losa export --onnx`` through the CLI: the folder and the JSON report."""
    result = runner.invoke(app, ["export", str(model), "--out", str(out), "--onnx", "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_export_logits_match_and_zeros_preserved(pruned_llama, exported):
    out, report = exported
    check = report["onnx"]["verification"]
    assert check["prefill_max_abs_diff"] < 1e-4 and check["decode_max_abs_diff"] < 1e-4
    assert check["weights_checked"] == 14 and check["zero_mismatches"] == [] and check["greedy_match"] is True
    # independent recount: the multiset of zero fractions of the ONNX MatMul weights holds every pruned layer's
    model = load_model(str(pruned_llama)).model
    per_layer, _, global_sparsity, checksum = sparsity_report(model)
    assert report["global_sparsity"] == pytest.approx(global_sparsity) and report["mask_checksum"] == checksum
    weights = onnx_export.onnx_matmul_weights(out / "onnx" / "prefill.onnx")
    onnx_fractions = sorted(float((w == 0).mean()) for w in weights.values())
    for fraction in per_layer.values():
        assert any(abs(fraction - f) < 1e-12 for f in onnx_fractions)
    assert sum(f > 0.4 for f in onnx_fractions) == len(per_layer)  # lm_head is not pruned
    # the saved safetensors keep the mask; the manifest links to the input
    assert sparsity_report(load_model(str(out)).model)[3] == checksum
    manifest = json.loads((out / "losa_manifest.json").read_text())
    assert manifest["command"] == "export" and manifest["results"]["onnx"]["verification"]["greedy_match"] is True
    assert manifest["versions"]["onnx"] == metadata.version("onnx")


def test_onnx_logits_match_torch_on_fresh_inputs(pruned_llama, exported):
    out, _ = exported
    model = load_model(str(pruned_llama)).model
    session = onnx_export.ort_session(out / "onnx" / "prefill.onnx")
    ids = torch.randint(0, model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: positions must come from the mask, as in transformers
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        reference = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
    logits = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert np.abs(logits[1:] - reference[1:]).max() < 1e-4
    assert np.abs(logits[0, 4:] - reference[0, 4:]).max() < 1e-4


def test_decode_graph_reproduces_greedy_generation(pruned_llama, exported):
    out, _ = exported
    model = load_model(str(pruned_llama)).model
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                                  do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    prefill = onnx_export.ort_session(out / "onnx" / "prefill.onnx")
    decode = onnx_export.ort_session(out / "onnx" / "decode.onnx")
    tokens = onnx_export.onnx_greedy(prefill, decode, ids.numpy(), 6, model.config.num_hidden_layers)
    assert tokens.tolist() == expected.tolist()


def test_export_static_shapes_and_external_data(pruned_llama, tmp_path):
    config = ExportConfig(model=str(pruned_llama), out=str(tmp_path / "static"), onnx=True, batch=1, seqlen=8)
    result = run_export(config)
    folder = tmp_path / "static" / "onnx"
    assert result.onnx["graphs"]["external_data"] is True
    assert (folder / "weights.data").is_file() and not list(folder.glob("*.onnx.data"))
    assert result.onnx["verification"]["zero_mismatches"] == [] and result.onnx["verification"]["greedy_match"]
    import onnx

    graph = onnx.load(str(folder / "prefill.onnx"), load_external_data=False).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 8]


def test_graphs_share_one_weight_file_and_weights_are_linked(pruned_llama, exported):
    """Lean exports: both graphs read one deduplicated weights.data (not a copy each), and the
    safetensors identical to the input's is a hard link to it, not a second copy."""
    import onnx

    out, _ = exported
    folder = out / "onnx"
    assert sorted(p.name for p in folder.iterdir()) == ["decode.onnx", "losa_onnx.json", "prefill.onnx", "weights.data"]
    for graph in ("prefill.onnx", "decode.onnx"):
        proto = onnx.load(str(folder / graph), load_external_data=False)
        locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"weights.data"}
        assert max(len(t.raw_data) for t in proto.graph.initializer) < 1024  # every weight is in weights.data
    weights = (out / "model.safetensors").stat().st_size
    assert (folder / "weights.data").stat().st_size < 1.15 * weights  # one copy of the weights, not two
    assert (out / "model.safetensors").stat().st_ino == (pruned_llama / "model.safetensors").stat().st_ino


def test_share_weights_deduplicates_by_content_and_keeps_values(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from losa_cli.export.onnx_weights import share_weights

    rng = np.random.default_rng(0)
    weight, other = rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal((32, 8)).astype(np.float32)
    for name, inits in (("a.onnx", [("w", weight), ("v", other)]), ("b.onnx", [("renamed", weight), ("v2", other)])):
        (w_name, w), (v_name, v) = inits
        nodes = [helper.make_node("MatMul", ["x", w_name], ["h"]), helper.make_node("MatMul", ["h", v_name], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                                  [numpy_helper.from_array(w, w_name), numpy_helper.from_array(v, v_name)])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / name))
    report = share_weights(tmp_path, {name: tmp_path / name for name in ("a.onnx", "b.onnx")})
    assert (report["tensors"], report["references"]) == (2, 4)
    assert report["bytes"] < weight.nbytes + other.nbytes + 2 * 4096
    x = rng.standard_normal((1, 64)).astype(np.float32)
    for name in ("a.onnx", "b.onnx"):
        got = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, x @ weight @ other, rtol=1e-5, atol=1e-5)


def test_export_verification_failure_writes_nothing(pruned_llama, tmp_path):
    config = ExportConfig(model=str(pruned_llama), out=str(tmp_path / "bad"), onnx=True, tolerance=1e-12)
    with pytest.raises(NumericalError, match="ONNX verification failed"):
        run_export(config)
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]


def test_export_output_exists_then_force(pruned_llama, tmp_path):
    out = tmp_path / "plain"
    first = runner.invoke(app, ["export", str(pruned_llama), "--out", str(out), "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["onnx"] is None and (out / "model.safetensors").is_file()
    again = runner.invoke(app, ["export", str(pruned_llama), "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    forced = runner.invoke(app, ["export", str(pruned_llama), "--out", str(out), "--force", "--json"])
    assert forced.exit_code == 0, forced.output


def test_export_bad_inputs(tmp_path, pruned_llama):
    with pytest.raises(ModelError):
        run_export(ExportConfig(model=str(tmp_path / "missing"), out=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="--onnx"):
        run_export(ExportConfig(model=str(pruned_llama), out=str(tmp_path / "o"), seqlen=8))
    with pytest.raises(ConfigError, match="opset"):
        run_export(ExportConfig(model=str(pruned_llama), out=str(tmp_path / "o"), onnx=True, opset=99))


def test_zero_check_notices_a_changed_weight(pruned_llama, exported):
    out, _ = exported
    model = load_model(str(pruned_llama)).model
    weights = onnx_export.onnx_matmul_weights(out / "onnx" / "prefill.onnx")
    assert all(c.onnx_zeros == c.model_zeros for c in onnx_verify.check_zeros(model, weights))
    name = next(n for n, w in weights.items() if (w == 0).any())
    weights[name] = np.where(weights[name] == 0, 1e-3, weights[name]).astype(np.float32)  # "revive" pruned weights
    assert sum(c.onnx_zeros is None for c in onnx_verify.check_zeros(model, weights)) >= 1


def test_summarize_quantiles():
    timing = summarize([4.0, 1.0, 3.0, 2.0, 5.0], tokens_per_run=10, compile_s=0.5)
    assert (timing.median_ms, timing.min_ms, timing.runs) == (3.0, 1.0, 5)
    assert timing.p90_ms == pytest.approx(4.6) and timing.tokens_per_s == pytest.approx(10 / 0.003)


BENCH_FIELDS = ("model", "sparse", "dense", "settings", "decode_protocol", "machine", "load_average_before",
                "load_average_after", "versions", "runs", "speedups", "notes", "warnings", "wall_time_s")


def _check_bench_json(report: dict, engines: list[str]) -> None:
    for key in BENCH_FIELDS:
        assert key in report, key
    assert report["machine"]["cpu"] and isinstance(report["machine"]["isa_flags"], list)
    assert report["settings"]["threads"] >= 1 and report["versions"]["onnxruntime"]
    seen = {(r["engine"], r["model"], r["phase"]) for r in report["runs"]}
    assert seen == {(e, m, p) for e in engines for m in ("sparse", "dense") for p in ("prefill", "decode")}
    for run in report["runs"]:
        assert run["error"] is None, run
        timing = run["timing"]
        assert timing["runs"] >= 1 and timing["median_ms"] > 0 and timing["tokens_per_s"] > 0
    expected = {(p, f"{e} sparse fp32") for e in engines for p in ("prefill", "decode")}
    assert {(s["phase"], s["sparse"]) for s in report["speedups"]} >= expected
    decode = [r for r in report["runs"] if r["phase"] == "decode"]
    assert all(0 < r["ceiling"]["share"] and r["ceiling"]["bytes_per_token"] > 0 for r in decode)
    assert report["machine"]["read_bandwidth_gb_s"] > 0
    assert report["sparse"]["matmul_zero_fraction"] > 0.3 and report["dense"]["matmul_zero_fraction"] == 0.0


@pytest.mark.skipif(not HAS_DEEPSPARSE, reason="DeepSparse is not installed (pip install 'losa[deepsparse]')")
def test_bench_both_engines_json_and_report(exported, tmp_path):
    out, _ = exported
    png = tmp_path / "bench.png"
    # --seqlen 16: DeepSparse 1.8 segfaults on these width-32 dense graphs below 16 tokens (fine at real sizes)
    result = runner.invoke(
        app,
        [
            "bench",
            "--cpu",
            str(out),
            "--engines",
            "onnxruntime,deepsparse",
            "--iterations",
            "1",
            "--warmup",
            "0",
            "--seqlen",
            "16",
            "--decode-tokens",
            "2",
            "--threads",
            "1",
            "--report",
            str(png),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    _check_bench_json(report, ["onnxruntime", "deepsparse"])
    assert report["settings"]["threads"] == 1 and report["dense"]["origin"].startswith("densified")
    assert any(
        s["sparse"] == "deepsparse sparse fp32" and s["dense"] == "onnxruntime dense fp32" for s in report["speedups"]
    )
    assert png.read_bytes()[:4] == b"\x89PNG" and report["report"] == str(png)


def test_bench_model_folder_against_dense_original_without_deepsparse(pruned_llama, tiny_models, monkeypatch):
    message = ("DeepSparse is not installed; ONNX Runtime does not exploit unstructured zeros, so only dense-vs-dense "
               "speed is measured")
    monkeypatch.setattr("losa_cli.runtime.bench_plan.deepsparse_unavailable", lambda: message)
    cores = os.cpu_count() or 1
    config = BenchConfig(
        model=str(pruned_llama),
        dense_baseline=str(tiny_models["llama"]),
        iterations=1,
        warmup=0,
        engines="onnxruntime,deepsparse",
        seqlen=8,
        decode_tokens=1,
        threads=cores + 1,
    )
    report = bench(config).to_dict()
    _check_bench_json(report, ["onnxruntime"])
    assert report["sparse"]["verification"]["greedy_match"] is True
    assert message in report["warnings"] and any("above the" in w for w in report["warnings"])


def test_bench_bad_inputs(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="neither an ONNX file"):
        bench(BenchConfig(model=str(tmp_path)))
    with pytest.raises(ConfigError, match="--engines"):
        bench(BenchConfig(model=str(tmp_path), engines="tensorrt"))
    (tmp_path / "r.png").write_bytes(b"x")
    with pytest.raises(ConfigError, match="already exists"):
        bench(BenchConfig(model=str(tmp_path), report=str(tmp_path / "r.png")))
    result = runner.invoke(app, ["bench", str(tmp_path / "notes.txt")])
    assert result.exit_code == 2 and "error" in result.output


def test_link_identical_links_only_byte_identical_files(tmp_path):
    from losa_cli.core.atomic import link_identical

    source, staging = tmp_path / "source", tmp_path / "staging"
    source.mkdir(), staging.mkdir()
    for name, original, staged in (
        ("same.safetensors", b"abcd" * 100, b"abcd" * 100),
        ("differs.safetensors", b"abcd" * 100, b"abce" * 100),
        ("new.safetensors", None, b"x" * 10),
    ):
        if original is not None:
            (source / name).write_bytes(original)
        (staging / name).write_bytes(staged)
    assert link_identical(source, staging) == ["same.safetensors"]
    assert (staging / "same.safetensors").stat().st_ino == (source / "same.safetensors").stat().st_ino
    assert (staging / "differs.safetensors").read_bytes() == b"abce" * 100
    assert (staging / "differs.safetensors").stat().st_ino != (source / "differs.safetensors").stat().st_ino
