"""SparseGPT against an independent, explicit OBS implementation written here."""

import pytest
import torch

from losa_cli.prune.sparsegpt import CholeskyError, HessianAccumulator, sparsegpt_prune


def reference_obs(weight, hessian, sparsity, nm, blocksize, damp, first=None):
    """Explicit OBS in fp64 with a fresh inverse of the not-yet-processed columns at every step.

    Saliency of column j: w^2 / [inv(H[j:, j:])]_00; pruning column j moves the others by
    -(w_j - q_j) / [inv]_00 * inv[0, :].  The mask of each column block is chosen at the start
    of the block from the current weights (unstructured: the block's share of the exact total).
    Weights in ``first`` (already pruned) are always in the mask; the quota's rest goes to the
    lowest saliencies among the others, and a block's share is capped so that the already-pruned
    weights of later blocks still fit in the total.
    """
    w = weight.double().clone()
    h = hessian.double().clone()
    rows, cols = w.shape
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=torch.float64)
    first = torch.zeros(rows, cols, dtype=torch.bool) if first is None else first.clone()
    mask = first.clone()
    pruned = 0
    d = torch.tensor([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(cols)], dtype=torch.float64)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        if nm is None:
            given = first[:, start:end].flatten()
            later = int(first[:, end:].sum())  # room kept for the already-pruned weights to come
            k = min(round(rows * end * sparsity), round(rows * cols * sparsity) - later) - pruned - int(given.sum())
            sal = (w[:, start:end] ** 2 / d[start:end] ** 1).flatten()  # d_j = U_jj^2
            candidates = [int(i) for i in torch.argsort(sal) if not given[i]]
            block = given.clone()
            block[candidates[: max(k, 0)]] = True
            mask[:, start:end] = block.view(rows, end - start)
            pruned += int(block.sum())
        for j in range(start, end):
            if nm is not None and (j - start) % nm[1] == 0:
                sal = w[:, j : j + nm[1]] ** 2 / d[j : j + nm[1]]
                for r in range(rows):
                    need = nm[0] - int(first[r, j : j + nm[1]].sum())
                    free = [int(c) for c in torch.argsort(sal[r]) if not first[r, j + int(c)]]
                    for c in free[: max(need, 0)]:
                        mask[r, j + c] = True
            inv = torch.linalg.inv(h[j:, j:])
            q = torch.where(mask[:, j], torch.zeros_like(w[:, j]), w[:, j])
            err = (w[:, j] - q) / inv[0, 0]
            w[:, j:] -= err.unsqueeze(1) * inv[0, :].unsqueeze(0)
            w[:, j] = q
    return w, mask


def _problem(seed=0, rows=16, cols=32, tokens=256):
    torch.manual_seed(seed)
    x = torch.randn(tokens, cols) @ torch.randn(cols, cols) * 0.5  # correlated inputs
    acc = HessianAccumulator(cols)
    for chunk in x.split(50):
        acc.add(chunk)
    return torch.randn(rows, cols), acc.hessian, x


def test_hessian_accumulator_equals_2xtx_over_n():
    _, h, x = _problem()
    torch.testing.assert_close(h, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("blocksize", [128, 8])
def test_sparsegpt_matches_reference_unstructured(blocksize):
    weight, h, _ = _problem()
    ours = sparsegpt_prune(weight, h, 0.5, None, blocksize=blocksize, damp=0.01)
    ref_w, ref_mask = reference_obs(weight, h, 0.5, None, blocksize, 0.01)
    assert torch.equal(ours.mask, ref_mask)
    torch.testing.assert_close(ours.weight.double(), ref_w, rtol=1e-3, atol=1e-4)
    assert int((ours.weight == 0).sum()) == 16 * 32 // 2


def test_sparsegpt_matches_reference_nm():
    weight, h, _ = _problem(seed=1)
    ours = sparsegpt_prune(weight, h, 0.0, (2, 4), blocksize=16, damp=0.01)
    ref_w, ref_mask = reference_obs(weight, h, 0.0, (2, 4), 16, 0.01)
    assert torch.equal(ours.mask, ref_mask)
    torch.testing.assert_close(ours.weight.double(), ref_w, rtol=1e-3, atol=1e-4)
    assert ((ours.weight.reshape(16, 8, 4) == 0).sum(2) == 2).all()


def test_sparsegpt_beats_plain_masking_on_layer_output():
    weight, h, x = _problem(seed=2)
    ours = sparsegpt_prune(weight, h, 0.6)
    naive = weight.masked_fill(ours.mask, 0.0)
    exact = x @ weight.T
    assert (x @ ours.weight.T - exact).norm() < 0.95 * (x @ naive.T - exact).norm()


@pytest.mark.parametrize("sparsity", [0.3, 0.55, 0.7])
def test_sparsegpt_exact_total_count(sparsity):
    weight, h, _ = _problem(seed=3, rows=24, cols=200)
    ours = sparsegpt_prune(weight, h, sparsity, blocksize=64)
    assert int(ours.mask.sum()) == round(24 * 200 * sparsity)
    assert int((ours.weight == 0).sum()) == int(ours.mask.sum())


def test_cholesky_failure_names_damping():
    weight = torch.randn(4, 8)
    bad = torch.full((8, 8), float("nan"))
    with pytest.raises(CholeskyError, match="damping"):
        sparsegpt_prune(weight, bad, 0.5)


def test_cholesky_retries_with_more_damping_and_says_so():
    torch.manual_seed(4)
    weight = torch.randn(4, 8)
    h = torch.eye(8)
    h[0, 0] = -0.05  # indefinite, fixed by damping 0.1 * mean(diag)
    result = sparsegpt_prune(weight, h, 0.5, damp=0.01)
    assert result.damp > 0.01
    assert result.warnings and "used" in result.warnings[0]


def _already_pruned(rows, cols, seed, crowded_block=None, blocksize=8):
    """A random 30% of weights already zero, plus (optionally) one column block 90% zero."""
    g = torch.Generator().manual_seed(seed)
    first = torch.rand(rows, cols, generator=g) < 0.3
    if crowded_block is not None:
        s = crowded_block * blocksize
        first[:, s : s + blocksize] = torch.rand(rows, blocksize, generator=g) < 0.9
    return first


@pytest.mark.parametrize("sparsity", [0.5, 0.6])
def test_sparsegpt_never_revives_existing_zeros_unstructured(sparsity):
    """A block holding more zeros than its quota must keep all of them (they once came back)."""
    weight, h, _ = _problem(seed=5)
    first = _already_pruned(16, 32, seed=5, crowded_block=1)
    weight = weight.masked_fill(first, 0.0)
    ours = sparsegpt_prune(weight, h, sparsity, None, blocksize=8, damp=0.01, prune_first=first)
    assert bool((ours.weight[first] == 0).all()), "an already-pruned weight was revived"
    assert bool(ours.mask[first].all())
    assert int(ours.mask.sum()) == max(round(16 * 32 * sparsity), int(first.sum()))
    ref_w, ref_mask = reference_obs(weight, h, sparsity, None, 8, 0.01, first=first)
    assert torch.equal(ours.mask, ref_mask)
    torch.testing.assert_close(ours.weight.double(), ref_w, rtol=1e-3, atol=1e-4)


def test_sparsegpt_never_revives_existing_zeros_nm():
    """Groups with more existing zeros than N keep them all; the others get exactly N."""
    weight, h, _ = _problem(seed=6)
    first = _already_pruned(16, 32, seed=6)
    weight = weight.masked_fill(first, 0.0)
    ours = sparsegpt_prune(weight, h, 0.0, (2, 4), blocksize=16, damp=0.01, prune_first=first)
    assert bool((ours.weight[first] == 0).all()), "an already-pruned weight was revived"
    zeros = (ours.weight.reshape(16, 8, 4) == 0).sum(2)
    given = first.reshape(16, 8, 4).sum(2)
    assert torch.equal(zeros, given.clamp_min(2))
    ref_w, ref_mask = reference_obs(weight, h, 0.0, (2, 4), 16, 0.01, first=first)
    assert torch.equal(ours.mask, ref_mask)
    torch.testing.assert_close(ours.weight.double(), ref_w, rtol=1e-3, atol=1e-4)


def test_sparsegpt_ramps_nm_exactly():
    """1:4 then 2:4 on the result ends with exactly two zeros per group, the first one kept."""
    weight, h, _ = _problem(seed=7)
    one = sparsegpt_prune(weight, h, 0.0, (1, 4), blocksize=16)
    two = sparsegpt_prune(one.weight, h, 0.0, (2, 4), blocksize=16, prune_first=one.weight == 0)
    assert bool((two.weight[one.weight == 0] == 0).all())
    assert bool(((two.weight.reshape(16, 8, 4) == 0).sum(2) == 2).all())


def test_pruning_refuses_to_revive_a_weight(monkeypatch):
    """The per-layer check compares with the zeros before pruning, so it can fail."""
    from torch import nn

    from losa_cli.core.errors import NumericalError
    from losa_cli.prune import pruning

    weight, h, _ = _problem(seed=8)
    linear = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight.masked_fill(_already_pruned(16, 32, seed=8), 0.0))
    stats = HessianAccumulator(32)
    stats.hessian = h
    ok = pruning.prune_linear(linear, pruning.Criterion("sparsegpt"), 0.6, stats, "layer")
    assert ok == []
    real = pruning.sparsegpt_prune

    def reviving(weight, *args, **kwargs):
        result = real(weight, *args, **kwargs)
        result.weight[weight == 0] = 1.0
        return result

    monkeypatch.setattr(pruning, "sparsegpt_prune", reviving)
    with pytest.raises(NumericalError, match="became non-zero"):
        pruning.prune_linear(linear, pruning.Criterion("sparsegpt"), 0.7, stats, "layer")
