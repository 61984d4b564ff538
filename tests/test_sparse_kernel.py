"""The native sparse kernel against its PyTorch reference, the packed format, and SparseLinear in a model."""

from __future__ import annotations

import pytest
import torch

from losa_cli.core.modeling import block_linears, find_blocks, load_model
from losa_cli.runtime.kernels.native import available_paths, dense_weight, sparse_matmul
from losa_cli.runtime.kernels.packed import load_packed, pack, reference_matmul, save_packed, unpack
from losa_cli.runtime.kernels.sparse_linear import (
    DENSE_FROM,
    SparseLinear,
    block_linear_names,
    load_packed_into,
    sparsify,
)

PATHS = available_paths()
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-5, "int8": 1e-5}  # kernel vs reference on the same packed values


def _weight(rows: int, cols: int, sparsity: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    weight[torch.rand(rows, cols, generator=generator) < sparsity] = 0
    if rows > 3:
        weight[1] = 0  # an all-zero row
        weight[2] = torch.randn(cols, generator=generator)  # a fully dense row
    return weight


def test_the_portable_path_is_always_there():
    assert PATHS[-1] == "generic" and len(set(PATHS)) == len(PATHS)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (5, 13), (37, 100), (64, 257), (96, 576)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9, 1.0])
def test_kernel_equals_reference(path, dtype, rows, cols, sparsity):
    weight = _weight(rows, cols, sparsity, seed=rows * cols)
    packed = pack(weight, dtype)
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(1))
    for batch in (1, 5):
        expected = reference_matmul(x[:batch], packed)
        got = sparse_matmul(x[:batch], packed, path)
        scale = expected.abs().max().clamp_min(1.0)
        assert got.shape == (batch, rows)
        assert float((got - expected).abs().max() / scale) <= TOLERANCE[dtype] * cols ** 0.5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (5, 13), (64, 257), (96, 576)])
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 1.0])
def test_native_unpack_equals_the_reference(path, dtype, rows, cols, sparsity):
    packed = pack(_weight(rows, cols, sparsity, seed=rows + cols), dtype)
    expected = unpack(packed)
    if dtype == "int8":  # values times scale: one rounding either way
        torch.testing.assert_close(dense_weight(packed, path), expected, rtol=1e-6, atol=0)
    else:
        assert torch.equal(dense_weight(packed, path), expected)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_sparse_linear_is_right_below_and_above_the_dense_switch(dtype):
    linear = torch.nn.Linear(100, 37)
    with torch.no_grad():
        linear.weight.copy_(_weight(37, 100, 0.7, seed=8))
    module = SparseLinear.from_linear(linear, dtype)
    for tokens in (1, DENSE_FROM - 1, DENSE_FROM, 3 * DENSE_FROM + 1):
        x = torch.randn(2, tokens, 100, generator=torch.Generator().manual_seed(tokens))
        expected = reference_matmul(x.reshape(-1, 100), module.packed).reshape(2, tokens, 37) + linear.bias
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_dense_linear_at_every_thread_count(threads):
    weight = _weight(300, 200, 0.7, seed=3)
    x = torch.randn(3, 200)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for path in PATHS:
            torch.testing.assert_close(sparse_matmul(x, pack(weight), path), x @ weight.T, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(previous)


def test_packing_keeps_exactly_the_zeros_and_rounds_within_half_a_step():
    weight = _weight(40, 70, 0.7, seed=4)
    assert torch.equal(unpack(pack(weight)), weight)
    for dtype, step in (("bfloat16", 2 ** -8), ("int8", None)):
        packed = pack(weight, dtype)
        restored = unpack(packed)
        assert bool((restored[weight == 0] == 0).all())
        bound = weight.abs() * step if step else packed.scale[:, None] / 2
        assert bool(((restored - weight).abs() <= bound + 1e-7).all())


def test_packed_bytes_follow_the_format():
    weight = _weight(128, 512, 0.7, seed=5)
    kept = int((weight != 0).sum())
    packed = pack(weight)
    assert packed.nbytes() == 128 * 512 // 8 + (kept + 64) * 4 + 129 * 8
    assert pack(weight, "int8").nbytes() == 128 * 512 // 8 + (kept + 64) + 129 * 8 + 128 * 4


def test_save_and_load_round_trip(tmp_path):
    layers = {"a.proj": pack(_weight(20, 30, 0.5, 6), "int8"), "b": pack(_weight(7, 65, 0.9, 7), "bfloat16")}
    summary = save_packed(layers, tmp_path / "packed.safetensors")
    assert summary["layers"] == 2 and summary["bytes"] > summary["weight_bytes"] > 0
    loaded = load_packed(tmp_path / "packed.safetensors")
    for name, packed in layers.items():
        assert torch.equal(unpack(loaded[name]), unpack(packed)) and loaded[name].dtype == packed.dtype


def test_sparse_model_generates_what_the_dense_model_does(tiny_models, tmp_path):
    loaded = load_model(str(tiny_models["llama"]))
    model = loaded.model
    with torch.no_grad():
        for linear in block_linears(find_blocks(model)).values():
            linear.weight[torch.rand(linear.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.6] = 0
    prompt = torch.tensor([[5, 17, 42, 9, 100, 3]])
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False)
    names = block_linear_names(model)
    packed = sparsify(model, names)
    assert all(isinstance(model.get_submodule(name), SparseLinear) for name in names)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), expected)
    save_packed(packed, tmp_path / "packed.safetensors")
    fresh = load_model(str(tiny_models["llama"])).model
    with torch.no_grad():  # the same pruning, so the dense layers the file replaces match
        for linear in block_linears(find_blocks(fresh)).values():
            linear.weight[torch.rand(linear.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.6] = 0
    assert sorted(load_packed_into(fresh, tmp_path / "packed.safetensors")) == sorted(names)
    assert torch.equal(fresh.generate(prompt, max_new_tokens=8, do_sample=False), expected)


def test_generate_on_the_kernel_equals_dense_and_sampling_is_seeded(tiny_models):
    import json

    from typer.testing import CliRunner

    from losa_cli.cli import app

    runner = CliRunner()
    base = [
        "generate",
        "--model",
        str(tiny_models["llama"]),
        "--prompt",
        "the river and the city",
        "--max-new-tokens",
        "6",
        "--json",
    ]
    outputs = {}
    for kernel in ("off", "fp32"):
        result = runner.invoke(app, base + ["--kernel", kernel])
        assert result.exit_code == 0, result.output
        outputs[kernel] = json.loads(result.stdout)
    assert outputs["fp32"]["text"] == outputs["off"]["text"] and outputs["fp32"]["new_tokens"] == 6
    assert outputs["fp32"]["sparse_layers"] == 14 and outputs["fp32"]["kernel_path"] == PATHS[0]
    sampled = [
        json.loads(runner.invoke(app, base + ["--sample", "--seed", "3", "--kernel", "int8"]).stdout)["text"]
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    bad = runner.invoke(
        app, ["generate", "--model", str(tiny_models["llama"]), "--prompt", "x", "--max-new-tokens", "0"]
    )
    assert bad.exit_code != 0 and "--max-new-tokens must be at least 1" in bad.output and "Traceback" not in bad.output
