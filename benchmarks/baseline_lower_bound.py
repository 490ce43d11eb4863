"""The sampled lower bound as it was before it ran on the file (lipverify 0.x, kept verbatim for
benchmarks/lower_bounds.py: the "old" column). It searches the extracted graph and stops on a
wall-clock budget, so its value varies between runs; do not use it for anything else."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import jvp, vjp


@dataclass
class LowerBound:
    value: float
    x: torch.Tensor | None
    direction: torch.Tensor | None
    starts: int
    seconds: float


def _spectral_at(fn, x: torch.Tensor, iters: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample top singular value estimate of J(x_b) and its right singular vector (batched)."""
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    v = v / v.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (x.dim() - 1))
    _, pullback = vjp(fn, x)
    for _ in range(iters):
        _, jv = jvp(fn, (x,), (v,))
        (jtjv,) = pullback(jv)
        norms = jtjv.flatten(1).norm(dim=1).clamp_min(1e-300)
        v = jtjv / norms.reshape((-1,) + (1,) * (x.dim() - 1))
    _, jv = jvp(fn, (x,), (v,))
    return jv.flatten(1).norm(dim=1), v


def difference_quotient(fn, x: torch.Tensor, v: torch.Tensor, h: float = 1e-4) -> torch.Tensor:
    """||f(x + h v) - f(x - h v)|| / (2 h ||v||) per sample: always <= Lip(f)."""
    with torch.no_grad():
        diff = fn(x + h * v) - fn(x - h * v)
        return diff.flatten(1).norm(dim=1) / (2 * h * v.flatten(1).norm(dim=1))


def _ascend(fn, x: torch.Tensor, v: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """A few Adam steps on x increasing ||J(x) v|| (useful for smooth activations; harmless for ReLU)."""
    x = x.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        _, jv = jvp(fn, (x,), (v,))
        loss = -jv.flatten(1).norm(dim=1).sum()
        if not loss.requires_grad:  # ||J v|| does not depend on x (a linear map): nothing to ascend
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x.detach()


def lower_bound(fn: Callable[[torch.Tensor], torch.Tensor], input_shape, *, starts: int = 16,
                data: torch.Tensor | None = None, iters: int = 12, rounds: int = 200, seed: int = 0,
                budget_s: float = 10.0, batch: int = 16, ascent_steps: int = 5, patience: int = 25) -> LowerBound:
    """Best difference quotient found from random (Gaussian at several scales, uniform[0,1]) and data
    starts, refined by local search around the best points and gradient ascent on ||J(x) v||."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(input_shape)

    def fresh(n: int) -> torch.Tensor:
        k = max(1, n // 4)
        parts = [torch.randn((k,) + shape, generator=gen, dtype=torch.float64),
                 torch.rand((k,) + shape, generator=gen, dtype=torch.float64),
                 0.1 * torch.randn((k,) + shape, generator=gen, dtype=torch.float64),
                 3.0 * torch.randn((max(1, n - 3 * k),) + shape, generator=gen, dtype=torch.float64)]
        return torch.cat(parts)[:n]

    pool = fresh(starts)
    if data is not None and len(data):
        pool = torch.cat([data[:starts].to(torch.float64).reshape((-1,) + shape), pool])
    best_val, best_x, best_v = 0.0, None, None
    scale, n_evaluated, stale = 1.0, 0, 0
    for _ in range(rounds):
        vals, xs, vs = [], [], []
        for chunk in pool.split(batch):
            if time.perf_counter() - t0 > budget_s and (vals or best_x is not None):
                break
            _, v = _spectral_at(fn, chunk, iters, gen)
            if ascent_steps:
                chunk = _ascend(fn, chunk, v, ascent_steps, lr=0.05 * scale)
                _, v = _spectral_at(fn, chunk, max(2, iters // 3), gen)
            q = difference_quotient(fn, chunk, v)
            vals.append(q)
            xs.append(chunk)
            vs.append(v)
            n_evaluated += len(chunk)
        if not vals:
            break
        vals, xs, vs = torch.cat(vals), torch.cat(xs), torch.cat(vs)
        i = int(torch.argmax(torch.nan_to_num(vals, nan=-1.0)))
        if float(vals[i]) > best_val * (1 + 1e-3):
            stale = 0
        else:
            stale += 1
        if float(vals[i]) > best_val:
            best_val, best_x, best_v = float(vals[i]), xs[i:i + 1], vs[i:i + 1]
        if time.perf_counter() - t0 > budget_s or stale >= patience:
            break
        # next pool: perturbations of the best points (shrinking radius) and fresh random points
        top = xs[torch.argsort(vals, descending=True)[: max(1, batch // 4)]]
        if best_x is not None:
            top = torch.cat([best_x, top])
        noise = torch.randn((batch,) + shape, generator=gen, dtype=torch.float64) * (0.3 * scale)
        local = top.repeat((batch // len(top) + 1,) + (1,) * len(shape))[:batch] + noise
        pool = torch.cat([local, fresh(batch)])
        scale = max(scale * 0.7, 1e-3)
    return LowerBound(best_val, best_x, best_v, n_evaluated, time.perf_counter() - t0)
