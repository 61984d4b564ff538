"""The lean decode path (runtime/decode/) against transformers, and its native step against LeanModel.

Tiny models are built from config in memory with ``initializer_range=0.2``: logits of order 5, so a
wrong sign, offset or window moves them by far more than the fp32 tolerance (see
``test_tolerance_is_not_vacuous``).  Mistral gets a sliding window of 6, Gemma 3 has one of 8 on
its sliding layers; prompts of 12 plus 8 decode steps reach position 19, past both.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_config
from losa_cli.core.errors import ConfigError, ModelError
from losa_cli.runtime.decode import Decoder, LeanModel, NativeStep, build_plan, choose
from losa_cli.runtime.kernels.packed import unpack

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
VOCAB, PROMPT, STEPS = 320, 12, 8
ATOL = 5e-5  # observed differences are ~4e-6 on logits of order 5


def tiny_model(model_type: str, seed: int = 0, window_from_layer: int | None = None):
    """``window_from_layer`` (Qwen2, Qwen3): a sliding window of 6 on the layers from that one on."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, VOCAB)
    config.initializer_range = 0.2
    if model_type == "mistral":
        config.sliding_window = 6
    if window_from_layer is not None:
        config = type(config)(**{**config.to_dict(), "use_sliding_window": True, "sliding_window": 6,
                                 "max_window_layers": window_from_layer, "layer_types": None})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms and biases away from their init (1 or 0), so offsets and biases matter
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.3)
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return tiny_model(request.param)


def token_ids(length: int = PROMPT + STEPS, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def lean_logits(lean: LeanModel, ids: torch.Tensor) -> torch.Tensor:
    """Prefill the first PROMPT tokens, then one decode step per remaining token: logits [positions, vocab]."""
    lean.setup_cache(1, ids.shape[1])
    with torch.inference_mode():
        rows = [lean(ids[:, :PROMPT], 0)[0]]
        rows += [lean(ids[:, t:t + 1], t)[0] for t in range(PROMPT, ids.shape[1])]
    return torch.cat(rows)


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits[0]


def test_lean_model_matches_transformers(family_model):
    ids = token_ids()
    torch.testing.assert_close(lean_logits(LeanModel(build_plan(family_model)), ids),
                               reference_logits(family_model, ids), atol=ATOL, rtol=0)


def test_per_layer_windows_match_transformers():
    """Qwen3 with a window on its second layer only (``layer_types`` from ``max_window_layers``)."""
    model = tiny_model("qwen3", window_from_layer=1)
    plan = build_plan(model)
    assert plan.family.windows == (None, 6)
    ids = token_ids()
    torch.testing.assert_close(lean_logits(LeanModel(plan), ids), reference_logits(model, ids), atol=ATOL, rtol=0)
    native_against_lean(model, "int8")


def test_packed_fp32_lean_model_matches_transformers():
    """Packed fp32 layers: the prefill takes SparseLinear's unpack + GEMM path, the steps the kernel."""
    model = tiny_model("qwen2")
    ids = token_ids()
    torch.testing.assert_close(lean_logits(LeanModel(build_plan(model, "float32", "float32")), ids),
                               reference_logits(model, ids), atol=ATOL, rtol=0)


def test_tolerance_is_not_vacuous():
    """Gemma's norms without their 1 + w offset, or Mistral without its window, fail the comparison."""
    gemma = tiny_model("gemma3_text")
    plan = build_plan(gemma)
    for block in plan.blocks:
        block.attn_norm = block.attn_norm - 1.0
    ids = token_ids()
    assert (lean_logits(LeanModel(plan), ids) - reference_logits(gemma, ids)).abs().max() > 100 * ATOL
    mistral = tiny_model("mistral")
    plan = build_plan(mistral)
    plan.family = dataclasses.replace(plan.family, windows=(None,) * plan.family.layers)
    assert (lean_logits(LeanModel(plan), ids) - reference_logits(mistral, ids)).abs().max() > 100 * ATOL


@pytest.mark.parametrize("native", [True, False], ids=["native", "lean"])
def test_greedy_tokens_match_transformers(family_model, native):
    ids = token_ids(PROMPT)
    with torch.inference_mode():
        expected = family_model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                         pad_token_id=0)[0, PROMPT:].tolist()
    out = Decoder.from_model(family_model, native=native).generate(ids, 16, eos=())
    assert out.tokens == expected
    assert out.prompt_tokens == PROMPT and len(out.step_ms) == 15 and out.stopped_by == "max_new_tokens"


def native_against_lean(model, fmt: str | None, path: str | None = None) -> None:
    """From one prefilled cache, the native step and LeanModel's one-token forward give the same logits;
    packed layers run on the same kernel in both, so bf16 and int8 are held as tight as fp32."""
    plan = build_plan(model, fmt, fmt)
    lean, native = LeanModel(plan, path), NativeStep(plan, path)
    ids = token_ids()
    lean.setup_cache(1, ids.shape[1])
    native.bind_cache(lean.k_cache, lean.v_cache)
    with torch.inference_mode():
        lean(ids[:, :PROMPT], 0)
        prefilled = lean.k_cache.clone(), lean.v_cache.clone()
        expected = [lean(ids[:, t:t + 1], t)[0, -1] for t in range(PROMPT, ids.shape[1])]
        expected_cache = lean.k_cache.clone(), lean.v_cache.clone()
        lean.k_cache.copy_(prefilled[0])
        lean.v_cache.copy_(prefilled[1])
        got = [native.step(int(ids[0, t]), t).clone() for t in range(PROMPT, ids.shape[1])]
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), atol=ATOL, rtol=0)
    torch.testing.assert_close(lean.k_cache, expected_cache[0], atol=1e-5, rtol=0)  # same cache rows written
    torch.testing.assert_close(lean.v_cache, expected_cache[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", [None, "float32", "bfloat16", "int8"])
def test_native_step_matches_lean_model(family_model, fmt):
    native_against_lean(family_model, fmt)


@pytest.mark.parametrize("fmt", [None, "int8"])
def test_native_step_matches_lean_model_on_the_portable_path(fmt):
    """The generic (any-CPU) build of the step's loops, on the family that uses the most of them."""
    native_against_lean(tiny_model("gemma3_text"), fmt, "generic")


def test_sampling_is_reproducible_and_top_p_narrows():
    decoder = Decoder.from_model(tiny_model("llama"), blocks="int8", head="bfloat16")
    ids = token_ids(PROMPT)
    first = decoder.generate(ids, 24, sample=True, temperature=1.5, top_p=0.95, seed=7, eos=()).tokens
    assert decoder.generate(ids, 24, sample=True, temperature=1.5, top_p=0.95, seed=7, eos=()).tokens == first
    assert decoder.generate(ids, 24, sample=True, temperature=1.5, top_p=0.95, seed=8, eos=()).tokens != first
    greedy = decoder.generate(ids, 24, eos=()).tokens
    assert decoder.generate(ids, 24, sample=True, top_p=1e-6, seed=7, eos=()).tokens == greedy


def test_choose_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.3, 0.15]))
    generator = torch.Generator().manual_seed(0)
    drawn = {choose(logits, True, 1.0, 0.7, generator) for _ in range(200)}
    assert drawn == {1, 2}  # 0.5 < 0.7 needs the 0.3 too; 0.15 and 0.05 are out


def test_generation_stops_at_eos():
    model = tiny_model("llama")
    decoder = Decoder.from_model(model)
    tokens = decoder.generate(token_ids(PROMPT), 16, eos=()).tokens
    out = decoder.generate(token_ids(PROMPT), 16, eos=(tokens[3],))
    assert out.tokens == tokens[: tokens.index(tokens[3]) + 1] and out.stopped_by == "eos"


def test_context_limit_is_a_one_line_error():
    decoder = Decoder.from_model(tiny_model("llama"))  # max_position_embeddings 256
    with pytest.raises(ConfigError) as error:
        decoder.generate(token_ids(200), 57)
    assert "257 positions exceed the model's context of 256" in str(error.value)
    assert "\n" not in str(error.value)
    assert len(decoder.generate(token_ids(200), 56, eos=()).tokens) == 56  # exactly the context is fine


def test_unsupported_family_is_a_one_line_error():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("opt", VOCAB))
    with pytest.raises(ModelError) as error:
        build_plan(model)
    assert str(error.value) == ("the lean decoder does not run model_type 'opt'; "
                                "it runs llama, mistral, qwen2, qwen3, gemma3_text")


def test_fused_packed_weights_keep_every_pruned_zero():
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj):
            linear.weight[linear.weight.abs() < linear.weight.abs().median()] = 0
    qkv = build_plan(model, "float32").blocks[0].qkv
    fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert torch.equal(unpack(qkv.packed), fused)


def test_weight_bytes_per_token_counts_what_a_step_reads():
    model = tiny_model("qwen2")
    plan = build_plan(model, "int8", "bfloat16")
    bytes_ = plan.weight_bytes_per_token()
    packed = [linear for block in plan.blocks for linear in block.linears()] + [plan.head]
    biases = sum(block.qkv.bias.nbytes for block in plan.blocks)  # Qwen2: q/k/v biases
    assert bytes_["packed_weights"] == sum(linear.packed.nbytes() for linear in packed) + biases
    assert bytes_["dense_weights"] == 0
    norms = (2 * plan.family.layers + 1) * plan.family.hidden * 4
    assert bytes_["other"] == norms + plan.family.hidden * 4  # norms + one embedding row


def test_lean_model_compiles_whole():
    """LeanModel has no graph breaks: torch.compile(fullgraph=True) gives eager's logits."""
    model = tiny_model("qwen3")
    ids = token_ids()
    eager = lean_logits(LeanModel(build_plan(model)), ids)
    lean = LeanModel(build_plan(model))
    compiled = torch.compile(lean, fullgraph=True)
    lean.setup_cache(1, ids.shape[1] + 1)  # a step that reads the whole cache would compile once more
    with torch.inference_mode():
        rows = [compiled(ids[:, :PROMPT], 0)[0]]
        rows += [compiled(ids[:, t:t + 1], t)[0] for t in range(PROMPT, ids.shape[1])]
    torch.testing.assert_close(torch.cat(rows), eager, atol=ATOL, rtol=0)


def test_plan_of_an_already_sparsified_model_is_the_same():
    """A model whose linears are SparseLinear already (``sparsify``, ``load_packed_into``) reads back to
    the same weights (int8 repacked after unpacking: the same values and scales), and generates what
    transformers generates with those layers."""
    from losa_cli.runtime.kernels.sparse_linear import block_linear_names, sparsify

    model = tiny_model("qwen2")
    direct = build_plan(model, "int8", "bfloat16")
    sparsify(model, block_linear_names(model), "int8")
    sparsify(model, ["lm_head"], "bfloat16")
    plan = build_plan(model, "int8", "bfloat16")
    for ours, theirs in zip(plan.blocks, direct.blocks):
        for a, b in zip(ours.linears(), theirs.linears()):
            assert torch.equal(unpack(a.packed), unpack(b.packed))
    ids = token_ids(PROMPT)
    with torch.inference_mode():
        expected = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, PROMPT:].tolist()
    assert Decoder(plan).generate(ids, 16, eos=()).tokens == expected


def test_steps_grow_the_cache_up_to_the_context_and_no_further():
    decoder = Decoder.from_model(tiny_model("llama"))  # max_position_embeddings 256
    ids = token_ids(PROMPT)
    logits = decoder.prefill(ids)  # the cache holds what the prompt needs (grown in steps of 256)
    assert decoder.model.capacity >= PROMPT
    decoder.step(int(logits.argmax()), 255)  # the last position the model has
    with pytest.raises(ConfigError, match="257 positions exceed the model's context of 256"):
        decoder.step(5, 256)
    native = decoder.native
    with pytest.raises(RuntimeError, match="position 256 outside the cache"):
        native.step(5, 256)
    with pytest.raises(RuntimeError, match="token 320 outside the vocabulary"):
        native.step(VOCAB, 3)
