"""Proposal generators: where to look for a pair (x, y) across which the network stretches most.

Nothing computed here is reported: these functions run on a differentiable stand-in of the model
(the extracted graph in float64, or the user's torch module in float64) and propose points and
directions; the engine then measures every proposal on the file. All randomness comes from the
``torch.Generator`` passed in, and every batched computation runs on chunks of a fixed size, so the
proposals are a function of the seed and the model only.
"""

from __future__ import annotations

from typing import Callable

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]
CHUNK = 32  # samples per batched call of the stand-in


def bshape(t: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (t.dim() - 1)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(bshape(v))


def flat_out(fn: Fn) -> Fn:
    return lambda x: fn(x).reshape(len(x), -1)


def chunked(op: Callable, *tensors: torch.Tensor, chunk: int = CHUNK, tick: Callable[[], None] | None = None):
    """Apply ``op`` to fixed-size chunks (the last padded with copies of its last row); concatenate each
    returned tensor. Fixed shapes keep rounding independent of how many points are processed.
    ``tick`` is called before each chunk (the user's time cap raises from it)."""
    n = len(tensors[0])
    results = []
    for i in range(0, n, chunk):
        if tick is not None:
            tick()
        parts = [t[i:i + chunk] for t in tensors]
        pad = chunk - len(parts[0])
        if pad:
            parts = [torch.cat([p, p[-1:].expand((pad,) + p.shape[1:])]) for p in parts]
        out = op(*parts)
        out = out if isinstance(out, tuple) else (out,)
        results.append(tuple(o[: chunk - pad] for o in out))
    joined = tuple(torch.cat([r[k] for r in results]) for k in range(len(results[0])))
    return joined if len(joined) > 1 else joined[0]


def jacobian_products(fn: Fn, x: torch.Tensor):
    """(jv, vjp, m) at x: v -> J(x) v, u -> J(x)^T u and the output size m. J v is reverse mode twice
    (every op with a backward works; torch.func's forward mode costs more than it saves here)."""
    x = x.detach().requires_grad_(True)
    f = flat_out(fn)
    with torch.enable_grad():
        y = f(x)

    def vjp(u: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(y, x, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(x) if g is None else g

    def jv_reverse(v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            u = torch.zeros_like(y, requires_grad=True)
            (g,) = torch.autograd.grad(y, x, u, create_graph=True, allow_unused=True)
            if g is None or not g.requires_grad:
                return torch.zeros_like(y)
            (out,) = torch.autograd.grad(g, u, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(y) if out is None else out

    return jv_reverse, vjp, y.shape[1]


SMALL_OUTPUT = 32  # up to this many outputs the Jacobian is formed row by row and decomposed exactly


def top_singular(fn: Fn, x: torch.Tensor, iters: int, gen: torch.Generator,
                 chunk: int = CHUNK, tick: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: sigma_max(J(x)) and its right singular vector. With few outputs, exactly (the
    Jacobian's rows by reverse mode, then the small Gram matrix J J^T); otherwise ``iters`` steps of
    power iteration on J^T J from a random vector. A proposal only."""

    def one(xc: torch.Tensor, v: torch.Tensor):
        jv, vjp, m = jacobian_products(fn, xc)
        if m <= SMALL_OUTPUT:
            rows = torch.stack([vjp(torch.nn.functional.one_hot(torch.full((len(xc),), i), m).to(xc.dtype)).flatten(1)
                                for i in range(m)], dim=1)  # (B, m, n)
            evals, evecs = torch.linalg.eigh(rows @ rows.transpose(1, 2))
            u = evecs[:, :, -1:]  # top left singular vector
            right = (rows.transpose(1, 2) @ u)[:, :, 0]
            return evals[:, -1].clamp_min(0).sqrt(), unit(right.reshape(xc.shape) + 1e-300 * v)
        v = unit(v)
        for _ in range(iters):
            v = unit(vjp(jv(v)).detach())
        return jv(v).detach().norm(dim=1), v

    v0 = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return chunked(one, x, v0, chunk=chunk, tick=tick)


def top_singular_block(fn: Fn, x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """The k top right singular vectors of J at one point x (shape (1, *s)): subspace iteration."""
    jv, vjp, _ = jacobian_products(fn, x.expand((1,) + x.shape[1:]))
    n = x[0].numel()
    k = max(1, min(k, n))
    V = torch.randn((n, k), generator=gen, dtype=x.dtype)
    shape = x.shape[1:]
    for _ in range(iters):
        cols = [vjp(jv(V[:, i].reshape((1,) + shape))).detach().reshape(-1) for i in range(k)]
        V, _ = torch.linalg.qr(torch.stack(cols, dim=1))
    return V.T.reshape((k,) + shape)


def pair_quotient(fn: Fn, x: torch.Tensor, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """||fn(x + h v) - fn(x - h v)|| / (2 h ||v||) per sample (differentiable)."""
    diff = flat_out(fn)(x + h * v) - flat_out(fn)(x - h * v)
    return diff.norm(dim=1) / (2 * h.flatten() * v.flatten(1).norm(dim=1))


STEP_SCALES = (0.25, 1.0, 4.0, 16.0, 64.0, 256.0)  # per-start step sizes, cycled: the best one depends on the model
DIRECTION_STEP = 0.05  # Adam step of a coordinate of the unit direction, times 1 / sqrt(input size)
STEP = 0.01  # Adam step of a coordinate, times point_size / sqrt(input size): ~STEP * size in L2


def pair_ascent(fn: Fn, x0: torch.Tensor, v0: torch.Tensor, steps: int, h_start: float = 3e-2,
                h_end: float = 1e-5, chunk: int = CHUNK, step_scales: tuple[float, ...] = STEP_SCALES,
                tick: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-start Adam on (x, v) maximising the pair quotient, with the half-width h shrinking
    geometrically from ``h_start`` to ``h_end`` (relative to the point's size): wide pairs see the
    activation pattern change (a ReLU net's Jacobian is constant on each piece, so ||J(x) v|| alone has
    no gradient in x), narrow ones converge to the local ||J(x)||. Every iterate is scored by its
    narrow quotient (width ``h_end``); returns the best iterate per start (x, unit v, that score).
    Start i moves with step STEP * step_scales[i % len(step_scales)] (Adam's step is the same whatever
    the gradient's scale, so the scale is put into the parametrisation x = x0 + step_i * size * z)."""
    n = max(x0[0].numel(), 1)
    scales = torch.tensor(step_scales, dtype=x0.dtype)[torch.arange(len(x0)) % len(step_scales)]
    step_of = STEP / n ** 0.5 * scales

    def run(x0c: torch.Tensor, v0c: torch.Tensor, stepc: torch.Tensor):
        stepc = stepc.reshape(bshape(x0c))
        size = point_size(x0c) * stepc
        z = torch.zeros_like(x0c, requires_grad=True)
        v = unit(v0c).clone().requires_grad_(True)
        opt = Adam([z, v], [1.0, DIRECTION_STEP / n ** 0.5])
        best_q = torch.full((len(x0c),), -1.0, dtype=x0c.dtype)
        best_x, best_v = x0c.clone(), unit(v0c)
        for step in range(steps + 1):
            if tick is not None:
                tick()
            h = h_start * (h_end / h_start) ** (step / max(1, steps))
            with torch.no_grad():  # score the current iterate
                x, vn = x0c + size * z, unit(v)
                q = torch.nan_to_num(pair_quotient(fn, x, vn, h_end * size / stepc), nan=-1.0)
                better = (q > best_q).reshape(bshape(x))
                best_q = torch.maximum(q, best_q)
                best_x, best_v = torch.where(better, x, best_x), torch.where(better, vn, best_v)
            if step == steps:
                break
            with torch.enable_grad():
                q = pair_quotient(fn, x0c + size * z, unit(v), h * size / stepc)
                loss = -torch.log(q.clamp_min(1e-300)).sum()
                if not loss.requires_grad:
                    break
                grads = torch.autograd.grad(loss, [z, v], allow_unused=True)
            opt.step(grads)
        return best_x.detach(), best_v.detach(), best_q.detach()

    return chunked(run, x0, v0, step_of, chunk=chunk)


class Adam:
    """Plain Adam (torch.optim's first step imports the compiler stack: seconds on a small model)."""

    def __init__(self, params: list[torch.Tensor], lrs: list[float], betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lrs, self.betas, self.eps, self.t = params, lrs, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, g, m, v, lr in zip(self.params, grads, self.m, self.v, self.lrs):
            if g is None:
                continue
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = m / (1 - b1 ** self.t)
            v_hat = v / (1 - b2 ** self.t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + self.eps))


def point_size(x: torch.Tensor) -> torch.Tensor:
    """1 + the root-mean-square coordinate of each point: the unit of steps and widths near it."""
    return (1.0 + x.flatten(1).norm(dim=1) / max(x[0].numel(), 1) ** 0.5).reshape(bshape(x))
