"""The fine-tune task losses: the margin loss is scale-free and trains the certified margin."""

from __future__ import annotations

import math

import pytest
import torch

from lipverify.errors import UserInputError
from lipverify.finetune.losses import TaskLoss


def _batch(seed=0, n=16, c=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)


def test_margin_loss_does_not_depend_on_the_output_scale():
    """Scaling the logits and the target together (what an output rescale does) leaves it unchanged."""
    out, y = _batch()
    a = TaskLoss("margin", target=2.0, beta=8.0, margin_eps=0.1, teacher_L=None)(out, y)
    b = TaskLoss("margin", target=6.0, beta=8.0, margin_eps=0.1, teacher_L=None)(3.0 * out, y)
    torch.testing.assert_close(a, b)
    assert a.shape == (16,)


def test_margin_loss_vanishes_exactly_beyond_the_certified_margin():
    """With a sharp temperature the loss is ~0 when f_y - f_j > sqrt(2) L eps for all j, and large
    when one class is inside that margin: the loss trains radius eps at L = target."""
    target, eps = 2.0, 0.25
    need = math.sqrt(2.0) * target * eps  # the logit margin that certifies radius eps at L = target
    loss = TaskLoss("margin", target=target, beta=200.0, margin_eps=eps, teacher_L=None)
    y = torch.tensor([0, 0])
    out = torch.tensor([[need * 1.2, 0.0, 0.0], [need * 0.8, 0.0, 0.0]])
    per = loss(out, y)
    assert per[0] < 1e-3 < 1.0 < per[1]


def test_plain_cross_entropy_and_distillation():
    out, y = _batch(1)
    ce = TaskLoss("ce", target=1.0, beta=16.0, margin_eps=0.0, teacher_L=None)
    torch.testing.assert_close(ce(out, y), torch.nn.functional.cross_entropy(out, y, reduction="none"))
    teacher = out * 40.0  # the same ranking at the teacher's larger L
    kd = TaskLoss("margin", target=0.5, beta=4.0, margin_eps=0.0, teacher_L=20.0)
    assert float(kd(out, teacher=teacher).max()) < 1e-5  # student f / 0.5 == teacher f / 20
    regression = TaskLoss("margin", target=1.0, beta=4.0, margin_eps=0.0, teacher_L=None)
    z = torch.randn(4, 1)
    torch.testing.assert_close(regression(z, teacher=z + 1.0), torch.ones(4))


@pytest.mark.parametrize("kind,beta,eps", [("hinge", 1.0, 0.0), ("margin", 0.0, 0.0), ("margin", 1.0, -1.0),
                                           ("margin", math.inf, 0.0)])
def test_bad_settings_are_refused(kind, beta, eps):
    with pytest.raises(UserInputError):
        TaskLoss(kind, target=1.0, beta=beta, margin_eps=eps, teacher_L=None)
