"""Base classes of the Lipschitz graph's operations.

Every op acts on a batch ``[B, *shape]`` and knows its own Lipschitz rule, the way auto_LiRPA's
bound classes each know their bound: adding an operation is adding one class.

- ``Op``: a unary map with a certified Lipschitz factor (``factor``) and a lower estimate.
- ``LinearOp``: a linear map (no offset). Its factor is its operator norm, and it exposes ``apply``
  (the linear part alone) so generic tools (power iteration, sketches) work on it.
- ``MergeOp``: combines several inputs (residual Add, Concat); it knows how Lipschitz bounds of
  its inputs combine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class NormResult:
    """A certified upper bound on an operator norm with a lower estimate beside it."""

    upper: float  # certified (already inflated by the margin)
    lower: float  # a true lower bound / estimate (e.g. power iteration), never above the true norm
    method: str  # how ``upper`` was obtained, e.g. "exact SVD", "FFT symbol bound"

    @property
    def gap(self) -> float:
        return self.upper / self.lower if self.lower > 0 else float("inf")


class Op:
    """A unary operation x -> op(x) on a batch."""

    kind = "Op"
    arity = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def factor(self, in_shape: tuple[int, ...], device: str = "cpu") -> NormResult:
        """Certified upper bound on the L2 Lipschitz constant of this op on inputs of ``in_shape``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def describe(self) -> str:
        return self.kind

    def magnitude(self, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """An upper bound on the magnitudes of the terms that make up each output entry, given the input
        ``x`` and a bound ``m >= |x|`` on the input's: the scale of float32 rounding (the self-check's
        per-output tolerance). Default: the op applied to ``m`` (right for maps with nonnegative weights)."""
        return self.forward(m)

    def terms(self, in_shape: tuple[int, ...]) -> int:
        """A count c with |rounding error| <= c * eps32 * magnitude for one output entry, whatever order the
        file's kernel sums in: a dot product of n terms errs by at most gamma_n ~ n * eps32 / 2 of the sum
        of its terms' magnitudes, so n + 2 holds it twice over; an activation's formula a few ulps per
        step. Default: an elementwise op."""
        return 2

    def to(self, dtype: torch.dtype) -> "Op":
        """Cast stored tensors (weights) to ``dtype``; returns self."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                setattr(self, name, value.to(dtype))
        return self


class LinearOp(Op):
    """A linear map A (no offset). ``forward == apply``; the factor is ||A||_2."""

    kind = "Linear"

    def apply(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)


class MergeOp:
    """An operation of several inputs."""

    kind = "Merge"
    arity = 2

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def combine(self, input_bounds: Sequence[float]) -> float:
        """Lipschitz bound of the output given bounds of each input w.r.t. the network input."""
        raise NotImplementedError  # pragma: no cover - abstract

    def magnitude(self, *ms: torch.Tensor) -> torch.Tensor:
        """See ``Op.magnitude``; merges add (or concatenate) their inputs' magnitudes."""
        return self.forward(*ms)

    def terms(self, in_shape: tuple[int, ...]) -> int:
        """See ``Op.terms``; a merge adds (or places) its inputs."""
        return self.arity

    def describe(self) -> str:
        return self.kind

    def to(self, dtype: torch.dtype) -> "MergeOp":
        return self
