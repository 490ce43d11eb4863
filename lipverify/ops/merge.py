"""Operations of several non-constant inputs: residual Add/Sub and Concat."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from lipverify.ops.base import MergeOp


class Add(MergeOp):
    """a + b (residual connection). Lip(a + b) <= Lip(a) + Lip(b) (triangle inequality)."""

    kind = "Add"

    def forward(self, a, b):
        return a + b

    def combine(self, input_bounds: Sequence[float]) -> float:
        return float(sum(input_bounds))


class Sub(MergeOp):
    kind = "Sub"

    def forward(self, a, b):
        return a - b

    def magnitude(self, a, b):
        return a + b

    def combine(self, input_bounds: Sequence[float]) -> float:
        return float(sum(input_bounds))


class Concat(MergeOp):
    """Concatenation along a per-sample axis: ||(Δa, Δb)||² = ||Δa||² + ||Δb||²."""

    kind = "Concat"

    def __init__(self, axis: int, arity: int):
        self.axis = int(axis)  # per-sample axis
        self.arity = int(arity)

    def forward(self, *xs):
        return torch.cat(xs, dim=self.axis + 1)

    def combine(self, input_bounds: Sequence[float]) -> float:
        return math.sqrt(sum(b * b for b in input_bounds))
