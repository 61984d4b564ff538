"""Mask selection and Wanda scores on plain tensors."""

import pytest
import torch

from losa_cli.core.modeling import SparsityTally
from losa_cli.prune.config import parse_nm
from losa_cli.prune.masks import layerwise_mask, nm_mask, rowwise_mask, satisfies_nm
from losa_cli.prune.wanda import InputNormAccumulator, wanda_scores


def test_rowwise_mask_prunes_exactly_per_row_and_the_lowest():
    torch.manual_seed(0)
    scores = torch.rand(16, 40)
    mask = rowwise_mask(scores, 0.3)
    assert (mask.sum(dim=1) == 12).all()
    kept_min = scores.masked_fill(mask, float("inf")).min(dim=1).values
    pruned_max = scores.masked_fill(~mask, float("-inf")).max(dim=1).values
    assert (pruned_max <= kept_min).all()


def test_rowwise_mask_exact_with_ties():
    scores = torch.ones(4, 10)
    assert (rowwise_mask(scores, 0.5).sum(dim=1) == 5).all()


def test_layerwise_mask_exact_count():
    torch.manual_seed(1)
    scores = torch.rand(7, 13)
    mask = layerwise_mask(scores, 0.6)
    assert int(mask.sum()) == round(91 * 0.6)
    assert scores[mask].max() <= scores[~mask].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_pattern_exact(n, m):
    torch.manual_seed(2)
    scores = torch.rand(8, 32)
    mask = nm_mask(scores, n, m)
    groups = mask.reshape(8, 32 // m, m)
    assert (groups.sum(dim=2) == n).all()
    weight = torch.randn(8, 32).masked_fill(mask, 0.0)
    assert satisfies_nm(weight, n, m)
    # the pruned ones are the lowest of their group
    grouped_scores = scores.reshape(8, -1, m)
    assert (
        grouped_scores.masked_fill(~groups, -1).max(2).values <= grouped_scores.masked_fill(groups, 9).min(2).values
    ).all()


def test_nm_mask_rejects_width_not_multiple():
    with pytest.raises(ValueError, match="multiple of 5"):
        nm_mask(torch.rand(2, 32), 2, 5)


@pytest.mark.parametrize("text", ["4:2", "2:2", "0:4", "a:b", "2-4", "2:4:8"])
def test_parse_nm_rejects_bad_patterns(text):
    with pytest.raises(ValueError):
        parse_nm(text)


def test_parse_nm_accepts():
    assert parse_nm("2:4") == (2, 4)
    assert parse_nm("4:8") == (4, 8)


def test_mask_checksum_changes_with_one_bit():
    def checksum(weight: torch.Tensor) -> str:
        block = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False))
        block[0].weight.data = weight
        tally = SparsityTally()
        tally.add_block(0, block)
        return tally.report()[3]

    weight = torch.ones(4, 8)
    other = weight.clone()
    other[1, 3] = 0
    assert checksum(weight) == checksum(weight.clone() * 2)  # only the zeros count
    assert checksum(weight) != checksum(other)


def test_input_norm_accumulator_matches_direct_norm_over_batches():
    torch.manual_seed(3)
    batches = [torch.randn(2, 5, 12, dtype=torch.bfloat16) for _ in range(3)]
    acc = InputNormAccumulator(12)
    for b in batches:
        acc.add(b)
    direct = torch.cat([b.float().reshape(-1, 12) for b in batches]).norm(dim=0)
    torch.testing.assert_close(acc.norms(), direct)
    assert acc.tokens == 30


def test_wanda_scores_weight_times_input_norm():
    weight = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    norms = torch.tensor([1.0, 10.0, 0.1])
    expected = torch.tensor([[1.0, 20.0, 0.3], [4.0, 50.0, 0.6]])
    torch.testing.assert_close(wanda_scores(weight, norms), expected)
    # row-wise: row 0 prunes column 2 (0.3) first, row 1 prunes column 2 (0.6)
    assert rowwise_mask(wanda_scores(weight, norms), 1 / 3).nonzero().tolist() == [[0, 2], [1, 2]]
