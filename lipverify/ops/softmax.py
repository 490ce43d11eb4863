"""Softmax over a per-sample axis. It is 1-Lipschitz in L2 (Gao & Pavel 2017, Prop. 4)."""

from __future__ import annotations

import torch

from lipverify.ops.base import NormResult, Op


class Softmax(Op):
    kind = "Softmax"

    def __init__(self, axis: int):
        self.axis = int(axis)  # per-sample axis

    def forward(self, x):
        return torch.softmax(x, dim=self.axis + 1)

    def magnitude(self, m, x):
        # outputs in [0, 1]; an input error e moves them by at most max e along the axis
        return torch.ones_like(m) + m.amax(dim=self.axis + 1, keepdim=True)

    def terms(self, in_shape):
        return int(in_shape[self.axis]) + 32  # exp per entry, their sum, a division

    def factor(self, in_shape, device="cpu"):
        return NormResult(upper=1.0, lower=0.0, method="1-Lipschitz (Gao & Pavel 2017)")
