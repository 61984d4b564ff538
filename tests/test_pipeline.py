"""The sequential pipeline reproduces the model, and sequential Wanda matches a full-model reference."""

import pytest
import torch

from losa_cli.core.modeling import find_blocks, find_linears, load_model
from losa_cli.core.sequential import sequential_blocks
from losa_cli.prune.masks import rowwise_mask
from losa_cli.prune.pruning import Criterion, prune_blocks
from losa_cli.prune.wanda import InputNormAccumulator, wanda_scores

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt"]


@pytest.mark.parametrize("arch", ARCHS)
def test_block_by_block_reproduces_full_forward(tiny_models, arch):
    loaded = load_model(str(tiny_models[arch]))
    torch.manual_seed(0)
    windows = torch.randint(3, 300, (3, 24))
    with torch.inference_mode():
        full = loaded.model(input_ids=windows, output_hidden_states=True, use_cache=False).hidden_states
    last_outputs = None
    for step in sequential_blocks(loaded.model, windows, torch.device("cpu")):
        for row in range(3):
            torch.testing.assert_close(step.inputs[row][0], full[step.index][row], rtol=1e-5, atol=1e-5)
        last_outputs = step.run()
    # the final hidden state in hidden_states has the final norm applied; compare before the norm
    blocks = find_blocks(loaded.model)
    with torch.inference_mode():
        captured = []
        handle = blocks[-1].register_forward_hook(
            lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out)
        )
        loaded.model(input_ids=windows, use_cache=False)
        handle.remove()
    torch.testing.assert_close(torch.cat(last_outputs), captured[0], rtol=1e-5, atol=1e-5)


def reference_sequential_wanda(model, windows, sparsity):
    """Wanda block by block using full-model forwards (no captured inputs): block l's statistics
    come from running the whole model, whose blocks < l are already pruned."""
    for block in find_blocks(model):
        norms = {}
        hooks = []
        for name, linear in find_linears(block).items():
            norms[name] = InputNormAccumulator(linear.in_features)
            hooks.append(linear.register_forward_hook(lambda m, a, o, acc=norms[name]: acc.add(a[0])))
        with torch.inference_mode():
            for row in range(windows.shape[0]):
                model(input_ids=windows[row : row + 1], use_cache=False)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for name, linear in find_linears(block).items():
                linear.weight.masked_fill_(
                    rowwise_mask(wanda_scores(linear.weight, norms[name].norms()), sparsity), 0.0
                )


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "opt"])
def test_sequential_wanda_matches_full_model_reference(tiny_models, arch):
    torch.manual_seed(1)
    windows = torch.randint(3, 300, (4, 32))
    ours = load_model(str(tiny_models[arch]))
    ref = load_model(str(tiny_models[arch]))
    prune_blocks(ours.model, Criterion("wanda"), [0.5, 0.5], windows, torch.device("cpu"))
    reference_sequential_wanda(ref.model, windows, 0.5)
    for (name, a), (_, b) in zip(ours.model.named_parameters(), ref.model.named_parameters()):
        assert torch.equal(a == 0, b == 0), name


def one_window_at_a_time(model, criterion, rate, windows):
    """The pass as it was before batching and shared statistics: one window per block forward, every linear
    layer with its own accumulator fed by a hook after its product, the whole block run to gather them."""
    from losa_cli.prune.pruning import prune_linear
    from losa_cli.prune.sparsegpt import HessianAccumulator

    make = HessianAccumulator if criterion.method == "sparsegpt" else InputNormAccumulator
    for step in sequential_blocks(model, windows, torch.device("cpu"), batch=1):
        linears = find_linears(step.block)
        stats = {name: make(linear.in_features) for name, linear in linears.items()}
        hooks = [linears[name].register_forward_hook(lambda m, a, o, acc=acc: acc.add(a[0])) for name, acc in
                 stats.items()]
        step.run()
        for hook in hooks:
            hook.remove()
        for name, linear in linears.items():
            prune_linear(linear, criterion, rate, stats[name], name)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_batched_shared_statistics_give_the_same_pruned_model(tiny_models, arch, method):
    """Several windows per forward, q/k/v and gate/up on one accumulator (one Hessian inverse), the
    statistics pass stopped before the last product: the same masks bit for bit, the same weights too."""
    torch.manual_seed(2)
    windows = torch.randint(3, 300, (6, 24))
    ours, reference = load_model(str(tiny_models[arch])).model, load_model(str(tiny_models[arch])).model
    prune_blocks(ours, Criterion(method), [0.6, 0.6], windows, torch.device("cpu"))
    one_window_at_a_time(reference, Criterion(method), 0.6, windows)
    for (name, a), (_, b) in zip(ours.named_parameters(), reference.named_parameters()):
        assert torch.equal(a == 0, b == 0), name
        assert torch.equal(a, b), name


def test_statistics_pass_shares_inputs_and_skips_the_last_product(tiny_models, monkeypatch):
    from losa_cli.prune import sparsegpt
    from losa_cli.prune.sparsegpt import HessianAccumulator

    model = load_model(str(tiny_models["llama"])).model
    windows = torch.randint(3, 300, (5, 16))
    step = next(sequential_blocks(model, windows, torch.device("cpu"), batch=2))
    products = []
    step.block.mlp.down_proj.register_forward_hook(lambda *args: products.append(1))
    stats = step.observe_linear_inputs(lambda linear: HessianAccumulator(linear.in_features))
    assert products == [], "the statistics pass ran the last layer's product"
    attn, mlp = "self_attn.", "mlp."
    assert stats[attn + "q_proj"] is stats[attn + "k_proj"] is stats[attn + "v_proj"]
    assert stats[mlp + "gate_proj"] is stats[mlp + "up_proj"]
    assert len({id(s) for s in stats.values()}) == 4
    assert all(s.tokens == 5 * 16 for s in stats.values())
    inverted = []
    real = sparsegpt.invert_hessian
    monkeypatch.setattr(sparsegpt, "invert_hessian", lambda h, d: (inverted.append(1), real(h, d))[1])
    for name, linear in find_linears(step.block).items():
        from losa_cli.prune.pruning import prune_linear

        prune_linear(linear, Criterion("sparsegpt"), 0.5, stats[name], name)
    assert len(inverted) == 4, "one Hessian inverse per distinct input"
    assert len(step.observe(None, outputs=True).outputs) == 5 and products == [1, 1, 1]
