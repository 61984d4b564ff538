"""``losa bench --engines losa``: losa's own kernel timed beside the ONNX engines, with an exact byte count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_export_bench import magnitude_prune
from typer.testing import CliRunner

from conftest import bench
from losa_cli.cli import app
from losa_cli.core.errors import ConfigError
from losa_cli.core.modeling import block_linears, find_blocks, load_model, sparsity_report
from losa_cli.runtime import BenchConfig
from losa_cli.runtime.kernels.native import available_paths
from losa_cli.runtime.kernels.packed import pack

runner = CliRunner()
SEQLEN = 12


@pytest.fixture(scope="module")
def pruned(tiny_models, tmp_path_factory) -> Path:
    return magnitude_prune(tiny_models["llama"], tmp_path_factory.mktemp("losa-bench") / "llama60", 0.6)


def _expected_decode_bytes(folder: Path, precision: str) -> int:
    """Recount, independently of the engine, what one batch-1 decode step reads in losa's format."""
    model = load_model(str(folder)).model
    config = model.config
    blocks_dtype, head_dtype = {"fp32": ("float32", None), "bf16": ("bfloat16", "bfloat16")}[precision]
    total = sum(pack(linear.weight, blocks_dtype).nbytes() for linear in block_linears(find_blocks(model)).values())
    head = model.get_output_embeddings().weight
    total += pack(head, head_dtype).nbytes() if head_dtype else head.numel() * 4
    norms = [m for m in model.modules() if "RMSNorm" in type(m).__name__]
    total += sum(m.weight.numel() * 4 for m in norms) + config.hidden_size * 4  # norms, one embedding row
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return total + 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * SEQLEN * 4


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
    for precision in ("fp32", "bf16"):
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
    with pytest.raises(ConfigError, match="no engine can run here"):
        bench(BenchConfig(model=str(graphs_only), engines="losa"))
    missing = runner.invoke(app, ["bench", "--cpu", str(tmp_path / "nowhere"), "--engines", "losa"])
    assert missing.exit_code != 0 and "does not exist" in missing.output and "Traceback" not in missing.output


def test_kernel_decode_follows_the_dense_model(pruned):
    """The losa engine's sparse fp32 model computes what the dense one does (same logits within fp32 rounding)."""
    from losa_cli.runtime.losa_engine import prepare_model

    dense, _ = prepare_model(str(pruned), "fp32", kernel=False)
    sparse, info = prepare_model(str(pruned), "fp32", kernel=True)
    assert info["packed_layers"] == len(block_linears(find_blocks(dense)))
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    with torch.inference_mode():
        torch.testing.assert_close(sparse(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_the_kernel_runs_inside_torch_compile(pruned):
    """The kernel is a torch operator: a compiled model keeps it in its graph and computes what eager does."""
    from losa_cli.runtime.losa_engine import prepare_model

    model, _ = prepare_model(str(pruned), "bf16", kernel=True)
    # 17 rows: the kernel's prefill GEMM (from gemm_from() = 16 rows) and the dense bf16 head on F.linear
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50]])
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, dynamic=False, fullgraph=True)  # fullgraph: no break at the kernel
    with torch.inference_mode():
        eager = model(ids).logits
        torch.testing.assert_close(compiled(input_ids=ids).logits, eager, rtol=1e-4, atol=1e-4)
        one = ids[:, :1]  # one row: the decode product
        torch.testing.assert_close(compiled(input_ids=one).logits, model(one).logits, rtol=1e-4, atol=1e-4)
