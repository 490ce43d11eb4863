"""Sketched (randomized) norm ESTIMATES of implicit linear operators. Nothing here is a certificate.

Shared by the ``rslmi`` and ``layerwise`` bound methods and meant for fine-tuning penalties too.
Everything works on a linear operator given only by its action ``apply`` (a batch of inputs of the
per-sample shape) and its adjoint (the exact vector-Jacobian product of ``apply``, or a closed form
such as a transposed convolution): the dense matrix is never formed.

The sketched LMI. RS-LMI replaces the layer condition ``tau I - W^T W >= 0`` (equivalent to
``||W||^2 <= tau``) by its compression onto a random subspace: with a sketch ``S`` (n x m, m << n)
of full column rank,

    S^T (tau I - W^T W) S >= 0   <=>   tau >= lambda_max(Q^T W^T W Q),   Q = orth(S),

so the smallest sketched-feasible tau is the Rayleigh-Ritz value ``tau_hat = sigma_max(W Q)^2``. We
take ``S = (W^T W)^q G`` with a Gaussian ``G`` (a randomized range finder with ``q`` block power
iterations, Halko-Martinsson-Tropp 2011), which makes tau_hat close to ||W||^2 quickly. Because Q
has orthonormal columns, tau_hat <= ||W||^2 ALWAYS: the sketched value is an under-estimate, a
good warm start and lower estimate, and never an upper bound. Certification is a separate,
deterministic step (see ``rslmi.py``).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import vjp

from lipverify.ops.base import LinearOp
from lipverify.ops.conv import Conv

Apply = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LinearMap:
    """An implicit linear operator on per-sample shapes: ``apply`` and ``adjoint`` act on batches."""

    apply: Apply
    adjoint: Apply
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    dtype: torch.dtype = torch.float64

    @property
    def n_in(self) -> int:
        return math.prod(self.in_shape)


def vjp_adjoint(apply: Apply, in_shape, dtype=torch.float64, device="cpu") -> Apply:
    """Adjoint of a linear ``apply`` by reverse-mode autodiff (exact for a linear map)."""

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        x0 = torch.zeros((y.shape[0],) + tuple(in_shape), dtype=y.dtype, device=y.device)
        _, pull = vjp(apply, x0)
        return pull(y)[0]

    return adjoint


def op_on(op: LinearOp, device: str = "cpu", dtype: torch.dtype = torch.float64) -> LinearOp:
    """A shallow copy of ``op`` whose floating tensors live on ``device`` in ``dtype`` (the graph's
    own op is left untouched)."""
    tensors = {k: v for k, v in vars(op).items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    if all(v.device == torch.device(device) and v.dtype == dtype for v in tensors.values()):
        return op
    clone = copy.copy(op)
    for k, v in tensors.items():
        setattr(clone, k, v.to(device=device, dtype=dtype))
    return clone


def linear_map(op: LinearOp, in_shape, out_shape, dtype: torch.dtype = torch.float64,
               device: str = "cpu") -> LinearMap:
    """The linear part of a graph op as a LinearMap on ``device`` (closed-form adjoint for convs).

    With a ``dtype`` other than float64 the map acts with a cast copy of the op: that is for the
    cheap power iterations of the sketch only.
    """
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    op = op_on(op, device, dtype)
    if isinstance(op, Conv):
        from lipverify.norms.conv import conv_adjoint

        def adjoint(y):
            return conv_adjoint(y, op.weight, in_shape, op.stride, op.pads, op.dilation, op.groups)

        return LinearMap(op.apply, adjoint, in_shape, out_shape, dtype)
    return LinearMap(op.apply, vjp_adjoint(op.apply, in_shape), in_shape, out_shape, dtype)


@dataclass
class SketchEstimate:
    """Result of the sketched LMI on one operator. ``tau_hat`` is an ESTIMATE (<= ||W||^2)."""

    tau_hat: float  # lambda_max(Q^T W^T W Q): smallest tau satisfying the sketched LMI
    sketch_dim: int
    iters: int
    seconds: float
    top_input: torch.Tensor | None = None  # unit input vector attaining sigma_hat (warm start)

    @property
    def sigma_hat(self) -> float:
        return math.sqrt(max(self.tau_hat, 0.0))


def _orth(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the span of a batch of m vectors (as a batch of m vectors)."""
    m = y.shape[0]
    q, _ = torch.linalg.qr(y.reshape(m, -1).T)
    return q.T.reshape(y.shape)


def _dtype_of(work: LinearMap, default: torch.Tensor) -> torch.dtype:
    return getattr(work, "dtype", default.dtype)


def sketched_tau(linmap: LinearMap, sketch_dim: int = 32, iters: int = 2, seed: int = 0,
                 device: str = "cpu", work_map: LinearMap | None = None) -> SketchEstimate:
    """Estimate ||W||^2 from the sketched LMI with a Gaussian sketch of ``sketch_dim`` columns.

    ``iters`` block power iterations run with ``work_map`` (the same operator in float32 is enough
    for a subspace and halves the cost; default: ``linmap`` itself); the final Rayleigh-Ritz step (orthonormalization, ``W Q`` and its singular
    values) is float64, so that tau_hat is a faithful Rayleigh quotient (<= ||W||^2 up to float64
    rounding). Cost: (2 iters + 1) * m operator applications. When the sketch dimension reaches
    the input dimension the sketch is the whole space and tau_hat equals ||W||^2 up to rounding,
    but it is still reported as an estimate.
    """
    start = time.perf_counter()
    n = linmap.n_in
    m = max(1, min(int(sketch_dim), n))
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    g = torch.randn((m,) + linmap.in_shape, generator=gen, dtype=torch.float64).to(device)
    work = work_map or linmap
    y = g
    with torch.no_grad():
        for _ in range(int(iters)):
            y = _orth(y.to(g.dtype)).to(_dtype_of(work, y))
            y = work.adjoint(work.apply(y))
        q = _orth(y.to(torch.float64))
        b = linmap.apply(q).reshape(m, -1)  # rows: W q_i
        # sigma_max(W Q) via the m x m Gram (eigvalsh is exact enough for an estimate)
        gram = b @ b.T
        evals, evecs = torch.linalg.eigh(gram)
    tau_hat = float(evals[-1].clamp_min(0.0))
    top = torch.tensordot(evecs[:, -1], q, dims=([0], [0]))
    top = top / top.norm().clamp_min(1e-300)
    return SketchEstimate(tau_hat=tau_hat, sketch_dim=m, iters=int(iters),
                          seconds=time.perf_counter() - start, top_input=top)


def power_sigma(apply: Apply, adjoint: Apply, v: torch.Tensor, steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable power-iteration estimate of ||A|| (an ESTIMATE, <= ||A||).

    ``v`` is a batch of one unit input vector (kept between calls as a warm start). ``steps``
    power steps on A^T A run without gradient; the returned ``||A v||`` is differentiable in
    whatever parameters ``apply`` closes over (the gradient of a simple singular value is
    u^T dA v, which this reproduces). Returns (sigma, new v).
    """
    with torch.no_grad():
        for _ in range(steps):
            w = adjoint(apply(v))
            nrm = w.norm()
            if nrm == 0:
                break
            v = w / nrm
    return apply(v).norm(), v.detach()
