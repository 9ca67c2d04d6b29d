import torch

from utils.losses import accuracy, ce_loss, mse_loss


def test_mse_sums_over_outputs_without_half_and_averages_over_samples():
    outputs = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    targets = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # sample 1: 1 + 4 + 0 = 5; sample 2: 4; mean 4.5
    assert mse_loss(outputs, targets).item() == 4.5
    assert mse_loss(outputs, targets, reduction="sum").item() == 9.0
    assert mse_loss(outputs, targets, reduction="none").tolist() == [5.0, 4.0]


def test_mse_gd_threshold_on_a_quadratic():
    """With L = mean (w x - y)^2 the Hessian is 2 mean x^2, so GD is stable iff lr < 2 / (2 mean x^2)."""
    x = torch.tensor([[1.0], [2.0]])
    y = torch.zeros(2, 1)
    w = torch.tensor([[0.5]], requires_grad=True)
    (hessian,) = torch.autograd.functional.hessian(lambda v: mse_loss(x @ v, y), w).reshape(1, 1)
    assert torch.allclose(hessian, torch.tensor([5.0]))


def test_ce_and_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    assert torch.allclose(ce_loss(logits, labels), torch.nn.functional.cross_entropy(logits, labels))
    assert abs(accuracy(logits, labels) - 2 / 3) < 1e-6
    assert abs(accuracy(logits, torch.nn.functional.one_hot(labels, 2).float()) - 2 / 3) < 1e-6
    assert accuracy(torch.tensor([[0.3], [-2.0]]), torch.tensor([[1.0], [1.0]])) == 0.5
