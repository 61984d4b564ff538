"""Distillation objectives: the math on tensors, and the teacher wired into a recover run."""

import copy

import pytest
import torch

from losa_cli.core.modeling import find_blocks, load_model
from losa_cli.recover.losses import feature_loss, kd_loss
from losa_cli.recover.objective import Objective


def test_kd_of_a_model_with_itself_is_zero_with_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    loss = kd_loss(logits, logits.detach(), torch.ones(2, 5), temperature=2.0)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6
    assert float(logits.grad.abs().max()) < 1e-7


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_equals_the_explicit_formula_on_masked_positions(temperature):
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]])
    expected, count = 0.0, 0
    for b in range(2):
        for i in range(4):
            if mask[b, i]:
                p = torch.softmax(teacher[b, i] / temperature, -1)
                q = torch.softmax(student[b, i] / temperature, -1)
                expected += float((p * (p.log() - q.log())).sum())
                count += 1
    value = kd_loss(student, teacher, mask, temperature)
    assert float(value) == pytest.approx(expected / count * temperature**2, rel=1e-5)


def test_feature_loss_is_the_mean_relative_block_error():
    torch.manual_seed(2)
    teacher = [torch.randn(1, 3, 4) * 100, torch.randn(1, 3, 4)]
    student = [t + 0.1 * torch.randn_like(t) for t in teacher]
    mask = torch.tensor([[1, 0, 1]])
    keep = mask.reshape(-1).bool()
    expected = (
        sum(
            float((s.reshape(-1, 4)[keep] - t.reshape(-1, 4)[keep]).pow(2).sum() / t.reshape(-1, 4)[keep].pow(2).sum())
            for s, t in zip(student, teacher)
        )
        / 2
    )
    assert float(feature_loss(student, teacher, mask)) == pytest.approx(expected, rel=1e-5)
    assert float(feature_loss(teacher, teacher, mask)) == 0.0


@pytest.mark.parametrize("kind", ["kd", "kd+ce", "squarehead"])
def test_objective_against_an_identical_teacher(kind, tiny_models):
    """Student == teacher: the distillation terms vanish (kd+ce leaves exactly the CE)."""
    model = load_model(str(tiny_models["llama"])).model
    teacher = copy.deepcopy(model)
    objective = Objective(kind, 1.0, teacher, find_blocks(model), find_blocks(teacher))
    batch = {"input_ids": torch.randint(3, 300, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    loss = objective(model, batch)
    ce = model(**batch).loss
    assert float(loss.detach()) == pytest.approx(float(ce.detach()) if kind == "kd+ce" else 0.0, abs=1e-5)
    # the feature hooks record only inside the objective: blocks run elsewhere leave nothing behind
    model(input_ids=batch["input_ids"])
    if objective.student_hooks is not None:
        assert objective.student_hooks.outputs == []


def test_objective_refuses_distillation_without_a_teacher():
    with pytest.raises(ValueError, match="teacher"):
        Objective("kd")
