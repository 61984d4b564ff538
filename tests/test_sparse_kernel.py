"""The native kernels against their PyTorch reference, the packed format and its validation, SparseLinear in a model."""

from __future__ import annotations

import json

import pytest
import torch

from losa_cli.core.modeling import block_linears, find_blocks, load_model
from losa_cli.runtime.kernels.native import available_paths, dense_weight, gemm_from, sparse_matmul
from losa_cli.runtime.kernels.packed import (
    PAD,
    PackedWeight,
    load_packed,
    pack,
    quantize_activations,
    reference_matmul,
    save_packed,
    unpack,
)
from losa_cli.runtime.kernels.sparse_linear import SparseLinear, block_linear_names, load_packed_into, sparsify

PATHS = available_paths()
DTYPES = ["float32", "bfloat16", "int8"]
#: decode products (tiles of up to 4 rows: 1, 3, 5) and prefill GEMMs (one partial tile, one full tile and a rest)
BATCHES = (1, 3, 5, 16, 23, 70)


def _weight(rows: int, cols: int, sparsity: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    weight[torch.rand(rows, cols, generator=generator) < sparsity] = 0
    if rows > 3:
        weight[1] = 0  # an all-zero row
        weight[2] = torch.randn(cols, generator=generator)  # a fully dense row
    return weight


def _check(got: torch.Tensor, expected: torch.Tensor, dtype: str, cols: int) -> None:
    """int8 sums are exact integers on every path: bit-equal; fp32/bf16 differ by summation order only."""
    assert got.shape == expected.shape
    if dtype == "int8":
        assert torch.equal(got, expected)
    else:
        scale = expected.abs().max().clamp_min(1.0)
        assert float((got - expected).abs().max() / scale) <= 1e-5 * cols ** 0.5


def test_the_portable_path_is_always_there():
    assert PATHS[-1] == "generic" and len(set(PATHS)) == len(PATHS) and gemm_from() > 4


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dense", [False, True], ids=["bitmask", "dense"])
@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (5, 13), (37, 100), (64, 257), (96, 576)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9, 1.0])
def test_kernel_equals_reference(path, dtype, dense, rows, cols, sparsity):
    packed = pack(_weight(rows, cols, sparsity, seed=rows * cols), dtype, dense=dense)
    assert packed.dense == dense
    x = torch.randn(max(BATCHES), cols, generator=torch.Generator().manual_seed(1))
    for batch in BATCHES:
        expected = reference_matmul(x[:batch], packed)
        _check(sparse_matmul(x[:batch], packed, path), expected, dtype, cols)
        product = "decode" if batch >= gemm_from() else "GEMM"  # the product this size does not run by default
        forced = sparse_matmul(x[:batch], packed, path, gemm_from=10**9 if product == "decode" else 1)
        _check(forced, expected, dtype, cols)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_path_at_one_and_two_threads(threads, dtype):
    weights = {"bitmask": pack(_weight(300, 200, 0.7, seed=3), dtype), "dense": pack(_weight(300, 200, 0.0, 3), dtype)}
    x = torch.randn(40, 200, generator=torch.Generator().manual_seed(2))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for path in PATHS:
            for packed in weights.values():
                for batch in (1, 4, 40):
                    _check(sparse_matmul(x[:batch], packed, path), reference_matmul(x[:batch], packed), dtype, 200)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dense", [False, True], ids=["bitmask", "dense"])
def test_int8_at_full_scale_would_saturate_int16_pair_sums(path, dense):
    """Weights and activations at +-127 everywhere: every vpmaddubsw pair sums 2 * 127 * 127 = 32258,
    one step from int16's limit, so a kernel that widens activations to unsigned (x + 128: 2 * 254 * 127)
    or adds two pair sums before widening saturates; the sign trick does not."""
    cols = 576
    signs = torch.where(torch.arange(cols) % 3 == 0, -1.0, 1.0)
    weight = torch.stack([signs, -signs, torch.ones(cols), -torch.ones(cols)]) * 0.5
    packed = pack(weight, "int8", dense=dense)
    assert int(packed.values.abs().max()) == 127
    x = torch.stack([signs, -signs, torch.ones(cols), torch.full((cols,), -128.0), torch.zeros(cols)])
    x[3, ::2] = 128.0  # 128-magnitude inputs: the quantizer scales them to 127 (and clamps), never to 128
    q, s = quantize_activations(x)
    assert int(q.abs().max()) == 127 and float(s[4]) == 0.0 and not bool(q[4].any())
    for batch in (1, 5, 20):
        rows = x.repeat(4, 1)[:batch]
        expected = reference_matmul(rows, packed)
        got = sparse_matmul(rows, packed, path)
        assert torch.equal(got, expected)
    # +-1 inputs and +-0.5 weights quantize without error: the product is the float one (288 = 576 * 0.5 ...)
    torch.testing.assert_close(sparse_matmul(x[:1], packed, path), x[:1] @ weight.T, rtol=1e-6, atol=0)
    assert not sparse_matmul(x[4:5], packed, path).any()  # an all-zero input row gives exact zeros


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (5, 13), (64, 257), (96, 576)])
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 1.0])
def test_native_unpack_equals_the_reference(path, dtype, rows, cols, sparsity):
    for dense in (False, True):
        packed = pack(_weight(rows, cols, sparsity, seed=rows + cols), dtype, dense=dense)
        rtol = 1e-6 if dtype == "int8" else 0.0  # int8: values times scale, one rounding either way
        torch.testing.assert_close(dense_weight(packed, path), unpack(packed), rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dense", [False, True], ids=["bitmask", "dense"])
def test_sparse_linear_is_right_below_and_above_the_gemm_switch(dtype, dense):
    linear = torch.nn.Linear(100, 37)
    with torch.no_grad():
        linear.weight.copy_(_weight(37, 100, 0.0 if dense else 0.7, seed=8))
    module = SparseLinear(pack(linear.weight, dtype, dense=dense), linear.bias)
    for tokens in (1, gemm_from() - 1, gemm_from(), 3 * gemm_from() + 1):
        x = torch.randn(2, tokens, 100, generator=torch.Generator().manual_seed(tokens))
        expected = reference_matmul(x.reshape(-1, 100), module.packed).reshape(2, tokens, 37) + linear.bias
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5)


def test_packing_keeps_exactly_the_zeros_and_rounds_within_half_a_step():
    weight = _weight(40, 70, 0.7, seed=4)
    assert torch.equal(unpack(pack(weight)), weight) and torch.equal(unpack(pack(weight, dense=True)), weight)
    for dtype, step in (("bfloat16", 2 ** -8), ("int8", None)):
        for dense in (False, True):
            packed = pack(weight, dtype, dense=dense)
            restored = unpack(packed)
            assert bool((restored[weight == 0] == 0).all())
            bound = weight.abs() * step if step else packed.scale[:, None] / 2
            assert bool(((restored - weight).abs() <= bound + 1e-7).all())


def test_packed_bytes_follow_the_format_and_pick_the_smaller_layout():
    weight = _weight(128, 512, 0.7, seed=5)
    kept = int((weight != 0).sum())
    packed = pack(weight)
    assert not packed.dense and packed.nbytes() == 128 * 512 // 8 + (kept + 64) * 4 + 129 * 8
    assert pack(weight, "int8").nbytes() == 128 * 512 // 8 + (kept + 64) + 129 * 8 + 128 * 4
    full = torch.randn(100, 128)  # no zeros: the dense layout reads fewer bytes, and is what pack picks
    assert pack(full, "bfloat16").dense and pack(full, "bfloat16").nbytes() == 100 * 128 * 2
    assert pack(full, "int8").nbytes() == 100 * 128 + 100 * 4 and pack(full, "int8").kept == 100 * 128
    assert pack(torch.randn(100, 130), "int8", dense=True).nbytes() == 100 * 192 + 100 * 4  # rows padded to 64


def test_quantized_activations_of_an_all_zero_row_are_zero():
    q, s = quantize_activations(torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]]))
    assert torch.equal(q[0], torch.zeros(3)) and float(s[0]) == 0
    assert torch.equal(q[1], torch.tensor([64.0, -127.0, 32.0]))


def _parts(packed: PackedWeight) -> dict:
    return {"mask": packed.mask, "values": packed.values, "row_offsets": packed.row_offsets, "scale": packed.scale,
            "rows": packed.rows, "cols": packed.cols}


def _broken(base: PackedWeight, **changes) -> dict:
    parts = _parts(base)
    parts.update(changes)
    return parts


def test_inconsistent_packed_weights_are_refused_with_one_clear_line():
    base = pack(_weight(6, 70, 0.5, seed=9))
    offsets = base.row_offsets
    shifted, falling = offsets.clone(), offsets.clone()
    shifted[3] += 1
    falling[3] = falling[2] - 1
    cases = {
        "start at 0": _broken(base, row_offsets=offsets + 1),
        "decrease": _broken(base, row_offsets=falling),
        "row 2 has": _broken(base, row_offsets=shifted),
        "padding need": _broken(base, values=base.values[: int(offsets[-1]) + PAD - 1]),
        "row_offsets must be int64": _broken(base, row_offsets=offsets[:-1]),
        "mask must be uint8": _broken(base, mask=base.mask.to(torch.int16)),
        "mask rows hold": _broken(base, mask=base.mask[:, :4]),
        "past the weight's width": {**_parts(pack(_weight(6, 128, 0.5, seed=9))), "cols": 70},
        "need a scale": _broken(base, values=base.values.to(torch.int8)),
        "scale must be float32": _broken(pack(_weight(6, 70, 0.5, 9), "int8"), scale=torch.ones(5)),
        "values dtype": _broken(base, values=base.values.double()),
        "dense values must be": _broken(pack(torch.randn(6, 70), dense=True), values=torch.zeros(6, 70)),
        "has no row offsets": _broken(pack(torch.randn(6, 70), dense=True), row_offsets=offsets),
    }
    for message, parts in cases.items():
        with pytest.raises(ValueError, match=message) as caught:
            PackedWeight(**parts)
        assert "\n" not in str(caught.value)


def test_a_tampered_file_is_refused_on_load_instead_of_crashing_the_kernel(tmp_path):
    from safetensors.torch import load_file, save_file

    save_packed({"layer": pack(_weight(8, 64, 0.5, seed=10))}, tmp_path / "good.safetensors")
    tensors = load_file(tmp_path / "good.safetensors")
    tensors["layer.row_offsets"][4:] += 1000  # rows 4+ would read 1000 values past their own
    from safetensors import safe_open

    with safe_open(tmp_path / "good.safetensors", "pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, tmp_path / "bad.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match="bad.safetensors: layer layer: .*row 3 has"):
        load_packed(tmp_path / "bad.safetensors")


def test_save_and_load_round_trip_with_both_layouts_and_v1_files(tmp_path):
    layers = {"a.proj": pack(_weight(20, 30, 0.5, 6), "int8"), "b": pack(_weight(7, 65, 0.9, 7), "bfloat16"),
              "head": pack(torch.randn(9, 64), "bfloat16")}
    assert layers["head"].dense
    summary = save_packed(layers, tmp_path / "packed.safetensors")
    assert summary["layers"] == 3 and summary["bytes"] > summary["weight_bytes"] > 0
    loaded = load_packed(tmp_path / "packed.safetensors")
    for name, packed in layers.items():
        assert torch.equal(unpack(loaded[name]), unpack(packed)) and loaded[name].dtype == packed.dtype
        assert loaded[name].dense == packed.dense
    from safetensors.torch import save_file

    v1 = {f"b.{part}": getattr(layers["b"], part) for part in ("mask", "values", "row_offsets")}
    header = {"format": "losa-bitmask-v1", "shapes": json.dumps({"b": [7, 65]})}
    save_file(v1, tmp_path / "v1.safetensors", metadata=header)
    assert torch.equal(unpack(load_packed(tmp_path / "v1.safetensors")["b"]), unpack(layers["b"]))


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
    # per block the fused q/k/v, o, the fused gate/up and down on the kernel (2 blocks), and the head
    assert outputs["fp32"]["sparse_layers"] == 2 * 4 + 1 and outputs["fp32"]["kernel_path"] == PATHS[0]
    sampled = [
        json.loads(runner.invoke(app, base + ["--sample", "--seed", "3", "--kernel", "int8"]).stdout)["text"]
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    bad = runner.invoke(
        app, ["generate", "--model", str(tiny_models["llama"]), "--prompt", "x", "--max-new-tokens", "0"]
    )
    assert bad.exit_code != 0 and "--max-new-tokens must be at least 1" in bad.output and "Traceback" not in bad.output
