import pytest
import torch
import torch.nn.functional as F

from unet_core import weighted_cross_entropy


def test_equals_weighted_mean_of_plain_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 6)
    target = torch.randint(0, 3, (2, 5, 6))
    weight = torch.rand(2, 5, 6) * 5
    expected = (F.cross_entropy(logits, target, reduction="none") * weight).mean()
    torch.testing.assert_close(weighted_cross_entropy(logits, target, weight), expected)


def test_uniform_weight_is_plain_cross_entropy_3d():
    logits = torch.randn(1, 2, 3, 4, 5)
    target = torch.randint(0, 2, (1, 3, 4, 5))
    torch.testing.assert_close(weighted_cross_entropy(logits, target, torch.ones(1, 3, 4, 5)),
                               F.cross_entropy(logits, target))


def test_gradients_flow():
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    loss = weighted_cross_entropy(logits, torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(1, 4, 4))
    loss.backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) > 0


@pytest.mark.parametrize(
    "target,weight,message",
    [
        (torch.zeros(1, 4, 5, dtype=torch.long), torch.ones(1, 4, 4), "target must have shape"),
        (torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(1, 4, 5), "weight must have shape"),
        (torch.zeros(1, 4, 4), torch.ones(1, 4, 4), "integer class indices"),
        (torch.zeros(1, 4, 4, dtype=torch.long), torch.ones(1, 4, 4, dtype=torch.long), "float tensor"),
    ],
)
def test_mismatched_inputs_raise(target, weight, message):
    with pytest.raises(ValueError, match=message):
        weighted_cross_entropy(torch.randn(1, 2, 4, 4), target, weight)
