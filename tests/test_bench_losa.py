"""``losa bench --engines losa``: losa's own kernel timed beside the ONNX engines, with an exact byte count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_export_bench import magnitude_prune
from typer.testing import CliRunner

from conftest import bench
from losa_cli.cli import app
from losa_cli.core.errors import ConfigError
from losa_cli.core.modeling import find_blocks, load_model, sparsity_report
from losa_cli.runtime import BenchConfig
from losa_cli.runtime.kernels.native import available_paths, gemm_from
from losa_cli.runtime.kernels.packed import pack

runner = CliRunner()
SEQLEN = 12


@pytest.fixture(scope="module")
def pruned(tiny_models, tmp_path_factory) -> Path:
    return magnitude_prune(tiny_models["llama"], tmp_path_factory.mktemp("losa-bench") / "llama60", 0.6)


def _expected_decode_bytes(folder: Path, precision: str) -> int:
    """Recount, independently of the engine, what one batch-1 decode step reads in losa's format: per block the
    fused q/k/v and gate/up products, o and down packed; the head packed (dense layout when it has no zeros); norms; one
    embedding row; the keys and values of the past and of the new token."""
    model = load_model(str(folder)).model
    config = model.config
    dtype = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}[precision]
    total = 0
    for block in find_blocks(model):
        attention, mlp = block.self_attn, block.mlp
        for group in ((attention.q_proj, attention.k_proj, attention.v_proj), (attention.o_proj,),
                      (mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)):
            total += pack(torch.cat([linear.weight for linear in group]), dtype).nbytes()
    total += pack(model.get_output_embeddings().weight, dtype).nbytes()  # the layout that reads fewer bytes
    norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__]
    total += sum(m.weight.numel() * 4 for m in norms) + config.hidden_size * 4  # norms, one embedding row
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return total + 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * (SEQLEN + 1) * 4


def test_losa_engine_rows_speedups_and_exact_bytes(pruned):
    result = runner.invoke(app, ["bench", "--cpu", str(pruned), "--engines", "losa", "--precisions", "fp32,bf16,int8",
                                 "--seqlen", str(SEQLEN), "--decode-tokens", "2", "--iterations", "1", "--warmup", "0",
                                 "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = {(r["model"], r["precision"], r["phase"]): r for r in report["runs"]}
    assert set(rows) == {
        (m, p, ph)
        for m, p in (("sparse", "fp32"), ("sparse", "bf16"), ("sparse", "int8"), ("dense", "fp32"))
        for ph in ("prefill", "decode")
    }
    for (model, _, _), row in rows.items():
        assert row["engine"] == "losa" and row["error"] is None and row["timing"]["median_ms"] > 0
        assert row["kernel_path"] == (available_paths()[0] if model == "sparse" else None)
    for precision in ("fp32", "bf16", "int8"):
        ceiling = rows[("sparse", precision, "decode")]["ceiling"]
        assert ceiling["bytes_per_token"] == _expected_decode_bytes(pruned, precision)
    dense_bytes = rows[("dense", "fp32", "decode")]["ceiling"]["bytes_per_token"]
    assert rows[("sparse", "fp32", "decode")]["ceiling"]["bytes_per_token"] < dense_bytes
    pairs = {(s["phase"], s["sparse"], s["dense"]) for s in report["speedups"]}
    assert {("decode", f"losa sparse {p}", "losa dense fp32") for p in ("fp32", "bf16", "int8")} <= pairs
    assert report["sparse"]["matmul_zero_fraction"] == pytest.approx(sparsity_report(load_model(str(pruned)).model)[2])


def test_losa_engine_beside_onnxruntime_and_refusals(pruned, tmp_path):
    report = bench(
        BenchConfig(
            model=str(pruned),
            engines="onnxruntime,losa",
            precisions="fp32,bf16",
            seqlen=8,
            decode_tokens=1,
            iterations=1,
            warmup=0,
            threads=1,
        )
    ).to_dict()
    engines = {(r["engine"], r["precision"]) for r in report["runs"]}
    assert engines == {("onnxruntime", "fp32"), ("losa", "fp32"), ("losa", "bf16")}  # bf16: losa only
    assert any("bf16 is timed on the losa engine only" in n for n in report["notes"])
    assert any(s["sparse"] == "losa sparse fp32" and s["dense"] == "onnxruntime dense fp32" for s in report["speedups"])
    graphs_only = tmp_path / "graphs"
    result = runner.invoke(app, ["export", str(pruned), "--out", str(graphs_only), "--onnx", "--no-safetensors"])
    assert result.exit_code == 0, result.output
    with pytest.raises(ConfigError, match="the losa engine runs a model's safetensors and .* has none"):
        bench(BenchConfig(model=str(graphs_only), engines="losa"))
    missing = runner.invoke(app, ["bench", "--cpu", str(tmp_path / "nowhere"), "--engines", "losa"])
    assert missing.exit_code != 0 and "does not exist" in missing.output and "Traceback" not in missing.output


def _assert_decoders_follow_the_model(pruned) -> None:
    """The losa engine's dense and sparse fp32 decoders give the model's logits within fp32 rounding, in the
    prefill (16 tokens: the kernel's GEMM) and in the native decode step (the decode product)."""
    from losa_cli.runtime.losa_engine import build_decoder

    model = load_model(str(pruned)).model
    dense, _ = build_decoder(str(pruned), "fp32", kernel=False)
    sparse, info = build_decoder(str(pruned), "fp32", kernel=True)
    assert info["kernel_path"] == available_paths()[0] and sparse.plan.head.packed is not None
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28]])
    assert ids.shape[1] - 2 >= gemm_from()
    with torch.inference_mode():
        reference = model(ids).logits[0]
    for decoder in (dense, sparse):
        prompt = decoder.prefill(ids[:, :-2])[0].clone()
        torch.testing.assert_close(prompt, reference[-3], rtol=1e-4, atol=1e-4)
        for position in (ids.shape[1] - 2, ids.shape[1] - 1):
            step = decoder.step(int(ids[0, position]), position)
            torch.testing.assert_close(step, reference[position], rtol=1e-4, atol=1e-4)


def test_kernel_decode_follows_the_dense_model(pruned):
    _assert_decoders_follow_the_model(pruned)


class _BrokenKernel:
    """The native extension with its GEMM answering 1e6 everywhere (a mutation the check must catch)."""

    def __init__(self, real) -> None:
        self.real = real

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def sparse_matmul(self, x, *args):
        y = self.real.sparse_matmul(x, *args)
        return torch.full_like(y, 1e6) if x.shape[0] >= gemm_from() else y


@pytest.mark.parametrize("broken", ["decode", "gemm"])
def test_the_dense_comparison_catches_a_broken_product(broken, pruned, monkeypatch):
    """Each product is covered: with the prefill GEMM or the native decode step broken, the check above fails."""
    from losa_cli.runtime.decode import native as decode_native
    from losa_cli.runtime.kernels import native

    if broken == "gemm":
        real = native.extension()
        monkeypatch.setattr(native, "extension", lambda: _BrokenKernel(real))
    else:
        real_step = decode_native.NativeStep.step
        monkeypatch.setattr(decode_native.NativeStep, "step",
                            lambda self, token, position: torch.full_like(real_step(self, token, position), 1e6))
    with pytest.raises(AssertionError):
        _assert_decoders_follow_the_model(pruned)


def test_the_kernel_runs_inside_torch_compile(pruned):
    """The kernel is a torch operator: a compiled model keeps it in its graph and computes what eager does."""
    from losa_cli.runtime.kernels.sparse_linear import block_linear_names, sparsify

    model = load_model(str(pruned)).model
    sparsify(model, block_linear_names(model), "bfloat16")
    # 17 rows: the kernel's prefill GEMM (from gemm_from() = 16 rows); one row: the decode product
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50]])
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, dynamic=False, fullgraph=True)  # fullgraph: no break at the kernel
    with torch.inference_mode():
        eager = model(ids).logits
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager, rtol=1e-4, atol=1e-4)
        one = ids[:, :1]
        torch.testing.assert_close(compiled(input_ids=one).logits, model(one).logits, rtol=1e-4, atol=1e-4)


def test_bench_data_gives_each_format_its_perplexity_and_agreement(pruned, eval_file):
    """--data: every row gets the perplexity of its exact format; sparse rows their top-1 agreement with the fp32
    sparse model; the densified ONNX copy (meaningless outputs) none."""
    report = bench(BenchConfig(model=str(pruned), engines="onnxruntime,losa", precisions="fp32,int8", seqlen=8,
                               decode_tokens=1, iterations=1, warmup=0, threads=1, data=str(eval_file),
                               data_seqlen=32, data_windows=3)).to_dict()
    accuracy = {(r["engine"], r["model"], r["precision"]): r["accuracy"] for r in report["runs"]
                if r["phase"] == "decode"}
    reference = accuracy[("losa", "dense", "fp32")]
    assert reference["top1_agreement"] == 1.0 and reference["windows"] == 3 and reference["seqlen"] == 32
    for engine in ("losa", "onnxruntime"):  # fp32 sparse: the reference's numbers up to summation order
        fp32 = accuracy[(engine, "sparse", "fp32")]
        assert fp32["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4) and fp32["top1_agreement"] > 0.99
        int8 = accuracy[(engine, "sparse", "int8")]
        assert int8["perplexity"] != fp32["perplexity"] and 0.5 < int8["top1_agreement"] <= 1.0
    assert accuracy[("onnxruntime", "dense", "fp32")] is None  # a densified copy
    result = runner.invoke(app, ["bench", str(pruned), "--engines", "losa", "--seqlen", "8", "--decode-tokens", "1",
                                 "--iterations", "1", "--warmup", "0", "--threads", "1", "--data", str(eval_file),
                                 "--data-seqlen", "32", "--data-windows", "2"])
    assert result.exit_code == 0, result.output
    assert "perplexity on" in result.stdout and "top-1 = fp32" in result.stdout


def test_no_compiler_a_short_reason_and_every_summary_still_drawn(pruned, tmp_path, monkeypatch, capsys):
    """Without a C++ compiler the sparse rows fail (the dense PyTorch rows run): the warning says what is missing
    in one short line (it quoted a 500-character build command), and the summary table, the chart and
    ``losa run``'s report cope with the sparse model's unknown zero fraction (a TypeError before)."""
    from losa_cli.cli import render
    from losa_cli.run.report import _speed_section
    from losa_cli.runtime import plot_report

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))  # nothing built: a build must run
    result = bench(BenchConfig(model=str(pruned), engines="losa", seqlen=8, decode_tokens=1, iterations=1, warmup=0,
                               threads=1))
    failed = [row for row in result.runs if row["error"]]
    assert {row["model"] for row in failed} == {"sparse"} and result.sparse["matmul_zero_fraction"] is None
    reasons = [w for w in result.warnings if "losa sparse" in w]
    assert reasons and all("there is no C++ compiler here" in w and len(w) < 400 for w in reasons), reasons
    render.bench(result)
    assert "zeros unknown" in capsys.readouterr().out
    assert plot_report(tmp_path / "speed.png", result).is_file()
    assert any("MatMul weights" in line for line in _speed_section(tmp_path, {"bench": {"results": result.to_dict()}},
                                                                    []))
    # generate builds the kernel in its own process: a fresh one, as a user's (this one has the kernel loaded,
    # and a loaded extension cannot be imported a second time)
    generated = subprocess.run([sys.executable, "-c", "from losa_cli.cli import main; main()", "generate", "--model",
                                str(pruned), "--prompt", "x", "--max-new-tokens", "1"], capture_output=True, text=True,
                               env=dict(os.environ), timeout=600)
    lines = generated.stderr.strip().splitlines()
    assert generated.returncode == 2 and len(lines) == 1 and "there is no C++ compiler here" in lines[0], lines
    assert len(lines[0]) < 300
