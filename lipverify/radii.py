"""Certified L2 robustness radii and certified accuracy from a certified Lipschitz bound.

For logits f(x), label y and margin m = f_y - max_{j != y} f_j:

- global form: if L bounds Lip(f) (L2 -> L2), each difference f_y - f_j is sqrt(2)*L Lipschitz
  (its gradient row e_y - e_j has norm sqrt(2)), so no perturbation with ||d|| < m / (sqrt(2) L)
  can make another logit reach f_y;
- pairwise form: with L_yj bounding Lip(f_y - f_j) directly, r = min_{j != y} (f_y - f_j) / L_yj.
  It is never worse when L_yj <= sqrt(2) L; the reported radius is the larger of the two forms
  (both are sound, so their maximum is).

A sample is certified at eps when eps < radius (strict: at distance exactly r a tie is possible).
A sample whose label logit is not strictly the largest (a tie, m == 0, or a misclassification,
m < 0) is never certified: its radius is 0. ``clean_accuracy`` counts the same way (ties are not
correct), so certified accuracy at eps = 0 equals clean accuracy.

Rounding. The radius is computed in float64 and rounded down by a few ulps. The logits are an
input: they should come from a float64 forward pass; ``logit_tol`` (an absolute error bound per
logit, one number or one per sample) is subtracted twice from every difference when the caller knows
its logits are less exact. For logits of the user's file (float32), ``logit_tolerances`` gives that
bound per sample over the whole ball the radius will claim (see there).
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from lipverify.errors import UserInputError
from lipverify.fileio import atomic_write_text

SQRT2 = math.sqrt(2.0)
# Rounds the float64 division down: a few ulps cover the division and sqrt(2) roundings.
_RADIUS_ROUND_DOWN = 1.0 - 8.0 * float(np.finfo(np.float64).eps)


@dataclass
class RadiiResult:
    """Per-sample results (numpy arrays of length n)."""

    index: np.ndarray  # int64: the sample's position in the dataset (after --limit selection)
    label: np.ndarray  # int64
    prediction: np.ndarray  # int64: argmax of the logits (the first on ties)
    margin: np.ndarray  # float64: f_y - max_{j != y} f_j
    radius_global: np.ndarray  # float64
    radius_pairwise: np.ndarray | None  # float64, None without a pairwise matrix
    radius: np.ndarray  # float64: max of the available forms (0 when not strictly correct)
    certified_at: dict[float, np.ndarray] = field(default_factory=dict)  # eps -> bool

    @property
    def n(self) -> int:
        return int(len(self.label))

    @property
    def form(self) -> str:
        """``pairwise`` when pairwise bounds were given (radius = max of both forms), else ``global``."""
        return "global" if self.radius_pairwise is None else "pairwise"


# float32 logits: relative rounding allowance (|error| <= LOGIT_REL_TOL * (1 + |logit|_max)), generous
LOGIT_REL_TOL = 1e-5


def model_logits(reference, x: np.ndarray) -> np.ndarray:
    return np.asarray(reference(x.astype(np.float32)), dtype=np.float64).reshape(len(x), -1)


def _eps_key(eps: float) -> str:
    """The JSON/CSV spelling of an eps value: shortest round-trip repr ("0.1", "1e-05")."""
    return repr(float(eps))


def compute_radii(
    logits: np.ndarray,
    labels: np.ndarray,
    L_global: float,
    L_pair: np.ndarray | None,
    eps_list: Sequence[float],
    index: np.ndarray | None = None,
    logit_tol: float | np.ndarray = 0.0,
    max_radius: np.ndarray | None = None,
) -> RadiiResult:
    """Certified radii of every sample (see the module docstring for the formulas). ``max_radius``
    (per sample) caps the radii: the ball on which ``logit_tol`` was shown to hold."""
    f = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if f.ndim != 2:
        raise UserInputError(f"logits must be [n, classes], got shape {f.shape}")
    n, c = f.shape
    if c < 2:
        raise UserInputError("certified radii need a classifier with at least 2 logits")
    if y.shape != (n,):
        raise UserInputError(f"{n} logit rows but labels have shape {y.shape}")
    if n and (y.min() < 0 or y.max() >= c):
        raise UserInputError(f"labels must lie in 0..{c - 1} for {c} logits")
    if not np.isfinite(f).all():
        raise UserInputError("the model produced NaN or infinite logits")
    L_global = float(L_global)
    if not (L_global > 0 and math.isfinite(L_global)):
        raise UserInputError(f"the global Lipschitz bound must be positive and finite, got {L_global}")
    logit_tol = np.broadcast_to(np.asarray(logit_tol, dtype=np.float64), (n,))
    if not (np.isfinite(logit_tol).all() and (logit_tol >= 0).all()):
        raise ValueError("logit_tol must be finite and >= 0")
    for eps in eps_list:
        if not (float(eps) >= 0 and math.isfinite(float(eps))):
            raise UserInputError(f"eps must be finite and >= 0, got {eps}")

    rows = np.arange(n)
    f_y = f[rows, y]
    others = f.copy()
    others[rows, y] = -np.inf
    margin = f_y - others.max(axis=1)
    prediction = f.argmax(axis=1).astype(np.int64)
    correct = margin > 0  # strictly the largest logit

    eff_margin = np.maximum(margin - 2.0 * logit_tol, 0.0)
    radius_global = np.where(correct, eff_margin / (SQRT2 * L_global) * _RADIUS_ROUND_DOWN, 0.0)

    radius_pairwise = None
    radius = radius_global
    if L_pair is not None:
        P = np.asarray(L_pair, dtype=np.float64)
        if P.shape != (c, c):
            raise UserInputError(f"pairwise bounds must be [{c}, {c}], got {P.shape}")
        off = ~np.eye(c, dtype=bool)
        if not (np.isfinite(P[off]).all() and (P[off] >= 0).all()):
            raise UserInputError("pairwise Lipschitz bounds must be finite and >= 0")
        diffs = f_y[:, None] - f - 2.0 * logit_tol[:, None]  # [n, c]
        Lyj = P[y]  # [n, c]
        with np.errstate(divide="ignore", invalid="ignore"):
            # L_yj == 0: f_y - f_j is constant, so that pair never flips (inf when diff > 0).
            ratio = np.where(Lyj > 0, diffs / np.where(Lyj > 0, Lyj, 1.0), np.where(diffs > 0, np.inf, 0.0))
        ratio[rows, y] = np.inf
        radius_pairwise = np.where(correct, np.maximum(ratio.min(axis=1), 0.0) * _RADIUS_ROUND_DOWN, 0.0)
        radius = np.maximum(radius_global, radius_pairwise)
    if max_radius is not None:
        cap = np.broadcast_to(np.asarray(max_radius, dtype=np.float64), (n,))
        radius_global = np.minimum(radius_global, cap)
        radius_pairwise = None if radius_pairwise is None else np.minimum(radius_pairwise, cap)
        radius = np.minimum(radius, cap)

    certified_at = {float(eps): radius > float(eps) for eps in eps_list}
    idx = np.arange(n, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
    return RadiiResult(idx, y, prediction, margin, radius_global, radius_pairwise, radius, certified_at)


TOLERANCE_RULE = ("per sample: 2 x F x eps32 x max_j M_j(|x| + r0) (F: the float32 operations rounding into an "
                  "output, summed over the nodes), M = the graph on |weights| (the self-check's "
                  "rounding scale) over the ball of the radius before allowance r0; rounded up to 2 digits")
REACH_CAP = 1e6  # an infinite radius (a class pair with L_yj = 0) is capped at 1e6 (1 + max|x|)


def logit_tolerances(graph, x_batches, logits: np.ndarray, labels: np.ndarray, L_global: float,
                     L_pair: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample bound on the float32 rounding error of each logit of the file, valid on the whole
    ball the sample's radius can claim.

    A radius promises that the FILE's prediction is constant on the ball, but the certified L bounds
    the exact function; the file's logits at x and at x + d each differ from it by their rounding.
    That error scales with the magnitudes of the terms summed inside the network, not with the logits
    (a network with large cancelling activations rounds far more than its outputs suggest), so the
    bound is the self-check's rule F * eps32 * M (F = graph.check.tolerance_factor) with M = the graph run on |weights| and
    |x|, taken at |x| + r0 (elementwise), where r0 is the radius before any allowance: every point of
    the ball has |x + d| <= |x| + r0 in each coordinate and M is monotone in its input, so it covers
    x and every x + d. The margin's difference then moves by at most 4 such errors; compute_radii
    subtracts 2 * logit_tol, hence logit_tol = 2 * F * eps32 * M. Rounded up to two
    significant digits so that `lipverify check` recomputes the same value on another machine.

    Returns (logit_tol, reach): pass both to compute_radii (``max_radius=reach``); reach is r0, capped
    where it is infinite (REACH_CAP), since no finite bound holds on an unbounded ball."""
    from lipverify.graph.check import EPS32, fits_float32, magnitude_pass, tolerance_factor

    factor = tolerance_factor(graph)
    r0 = compute_radii(logits, labels, L_global, L_pair, []).radius / _RADIUS_ROUND_DOWN
    base = LOGIT_REL_TOL * (1.0 + float(np.abs(logits).max())) if len(logits) else 0.0
    out, reach = np.empty(len(logits)), np.empty(len(logits))
    start = 0
    for x in x_batches:
        x = torch.as_tensor(np.asarray(x, dtype=np.float64))
        k = len(x)
        cap = REACH_CAP * (1.0 + x.abs().reshape(k, -1).amax(dim=1).numpy())
        reach[start:start + k] = np.minimum(r0[start:start + k], cap)
        ball = torch.from_numpy(reach[start:start + k]).reshape((-1,) + (1,) * (x.dim() - 1))
        with torch.no_grad():
            m, peak = magnitude_pass(graph, x.abs() + ball)
        m = m.reshape(k, -1).amax(dim=1).numpy()
        # where a float32 intermediate may overflow on the ball, the file's logits are unbounded there
        m = np.where(fits_float32(peak).numpy(), m, np.inf)
        out[start:start + k] = 2.0 * factor * EPS32 * m
        start += k
    if start != len(logits):
        raise ValueError(f"logit_tolerances: {start} inputs for {len(logits)} logit rows")
    tol = _round_up_2_digits(np.maximum(out, base))
    if not np.isfinite(tol).all():  # magnitudes overflow (float32 or float64): nothing can be certified there
        tol = np.where(np.isfinite(tol), tol, np.finfo(np.float64).max)
    return tol, reach


def _round_up_2_digits(v: np.ndarray) -> np.ndarray:
    """Round positive values up to two significant digits (machine-independent to recompute)."""
    v = np.asarray(v, dtype=np.float64)
    out = v.copy()
    pos = v > 0
    scale = 10.0 ** (np.floor(np.log10(v[pos])) - 1)
    out[pos] = np.ceil(v[pos] / scale) * scale * (1 + 4 * float(np.finfo(np.float64).eps))
    return out


def accuracy_curve(radius: np.ndarray, max_points: int = 400) -> dict[str, list[float]]:
    """Exact points of the step function acc(t) = mean(radius > t), t from 0 to the largest radius.

    At each distinct radius value t the curve drops (acc is right-continuous). Long curves are
    thinned to ``max_points`` by keeping evenly spaced points (each kept value is exact).
    """
    r = np.asarray(radius, dtype=np.float64)
    n = len(r)
    if n == 0:
        return {"radius": [], "certified_accuracy": []}
    pos = np.sort(r[(r > 0) & np.isfinite(r)])
    ts = np.concatenate([[0.0], np.unique(pos)])
    # acc(t) = #(r > t) / n, with inf radii always counted
    acc = (n - np.searchsorted(np.sort(r), ts, side="right")) / n
    if len(ts) > max_points:
        keep = np.unique(np.linspace(0, len(ts) - 1, max_points).round().astype(int))
        ts, acc = ts[keep], acc[keep]
    return {"radius": [float(t) for t in ts], "certified_accuracy": [float(a) for a in acc]}


def summarize(r: RadiiResult, eps_list: Sequence[float]) -> dict:
    """JSON-ready summary (the certificate's ``data`` block, less ``path``)."""
    n = r.n
    correct = r.margin > 0
    ties = r.margin == 0
    mis = r.margin < 0
    cert = {}
    for eps in eps_list:
        flags = r.certified_at.get(float(eps))
        if flags is None:
            flags = r.radius > float(eps)
        cert[_eps_key(eps)] = float(flags.mean()) if n else 0.0

    def q(p: float) -> float | None:
        if n == 0:
            return None
        v = float(np.quantile(r.radius, p, method="lower"))  # an actual sample's radius
        return v if math.isfinite(v) else None

    quantiles = {"q10": q(0.10), "q25": q(0.25), "median": q(0.5), "q75": q(0.75), "q90": q(0.90)}
    finite = r.radius[np.isfinite(r.radius)]
    quantiles["mean"] = float(finite.mean()) if len(finite) else None
    return {
        "n": n,
        "clean_accuracy": float(correct.mean()) if n else 0.0,
        "certified_accuracy": cert,
        "radius_quantiles": quantiles,
        "n_ties": int(ties.sum()),
        "n_misclassified": int(mis.sum()),
        "form": r.form,
        "curve": accuracy_curve(r.radius),
    }


def _fmt(v: float) -> str:
    return repr(float(v))


def write_csv(r: RadiiResult, eps_list: Sequence[float], path) -> None:
    """One row per sample; floats in shortest round-trip form; atomic (temp file + os.replace)."""
    path = os.fspath(path)
    eps_list = [float(e) for e in eps_list]
    header = ["index", "label", "prediction", "margin", "radius", "radius_global", "radius_pairwise"]
    header += [f"certified@{_eps_key(e)}" for e in eps_list]
    buffer = io.StringIO()
    w = csv.writer(buffer)
    w.writerow(header)
    for i in range(r.n):
        row = [
            str(int(r.index[i])),
            str(int(r.label[i])),
            str(int(r.prediction[i])),
            _fmt(r.margin[i]),
            _fmt(r.radius[i]),
            _fmt(r.radius_global[i]),
            "" if r.radius_pairwise is None else _fmt(r.radius_pairwise[i]),
        ]
        for e in eps_list:
            flags = r.certified_at.get(e)
            ok = bool(flags[i]) if flags is not None else bool(r.radius[i] > e)
            row.append("1" if ok else "0")
        w.writerow(row)
    atomic_write_text(path, buffer.getvalue())


def read_csv(path) -> dict[str, np.ndarray]:
    """Columns of a file written by ``write_csv`` (ints, floats, bools; NaN for an empty pairwise)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    cols: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        values = [row[j] for row in body]
        if name in ("index", "label", "prediction"):
            cols[name] = np.array([int(v) for v in values], dtype=np.int64)
        elif name.startswith("certified@"):
            cols[name] = np.array([v == "1" for v in values], dtype=bool)
        else:
            cols[name] = np.array([float(v) if v != "" else math.nan for v in values], dtype=np.float64)
    return cols


def pgd_inside_radius(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    radius,
    steps: int = 50,
    restarts: int = 2,
    seed: int = 0,
    shrink: float = 1e-4,
    judge: Callable[[np.ndarray], np.ndarray] | None = None,
    judge_tol: float = 0.0,
) -> np.ndarray:
    """L2 PGD inside each sample's ball; True where it found a point the model does not label y.

    A sanity attack on the certificate: a success inside a certified radius is a soundness bug.
    The ball is shrunk by a relative ``shrink`` so that float noise at a tight boundary (where the
    margin is exactly 0) is not reported as a bug. Samples with radius 0 are skipped (False).
    The loss is the CW margin max_{j != y} f_j - f_y; the first restart starts at x, later ones at
    a random point of the ball. Each sample is scored at every step, so the flag means some
    iterate changed the prediction.

    With ``judge`` (the user's file: float32 inputs -> logits) ``model_fn`` only supplies gradients
    and success is decided by the file at the perturbed point exactly as the file is called: the
    point is rounded to float32, must still lie in the ball after rounding (x itself as float32 is
    the centre), and another logit must exceed the label's by more than ``2 * judge_tol`` (the
    float32 rounding allowance of the logits, as in the radii).
    """
    gen = torch.Generator().manual_seed(int(seed))
    x = x.detach()
    y = torch.as_tensor(y, dtype=torch.long).reshape(-1)
    n = x.shape[0]
    r = torch.as_tensor(np.asarray(radius, dtype=np.float64), dtype=x.dtype).reshape(-1)
    active = (r > 0) & torch.isfinite(r)
    success = torch.zeros(n, dtype=torch.bool)
    if not bool(active.any()):
        return success.numpy()
    r_eff = torch.where(active, r * (1.0 - shrink), torch.zeros_like(r))
    view = (-1,) + (1,) * (x.dim() - 1)
    step = (2.5 * r_eff / max(steps, 1)).reshape(view)
    centre32 = x.numpy().astype(np.float32)

    def project(delta: torch.Tensor) -> torch.Tensor:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-30)
        factor = torch.clamp(r_eff / norms, max=1.0)
        return delta * factor.reshape(view)

    def fooled(logits: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if judge is None:  # strict: another logit above the label's (a tie is not a success)
            f_y = logits.gather(1, y[:, None])[:, 0]
            other = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
            return other > f_y
        point = (x + delta).detach().numpy().astype(np.float32)
        moved = np.linalg.norm((point.astype(np.float64) - centre32.astype(np.float64)).reshape(n, -1), axis=1)
        inside = torch.from_numpy(moved <= r_eff.numpy())
        out = torch.from_numpy(np.asarray(judge(point), dtype=np.float64).reshape(n, -1))
        f_y = out.gather(1, y[:, None])[:, 0]
        other = out.scatter(1, y[:, None], float("-inf")).max(dim=1).values
        return inside & (other - f_y > 2.0 * judge_tol)

    with torch.enable_grad():
        for restart in range(max(restarts, 1)):
            if restart == 0:
                delta = torch.zeros_like(x)
            else:
                g = torch.randn(x.shape, generator=gen, dtype=x.dtype)
                g = g / g.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(view)
                u = torch.rand(n, generator=gen, dtype=x.dtype) ** (1.0 / max(x[0].numel(), 1))
                delta = g * (r_eff * u).reshape(view)
            for _ in range(steps + 1):
                delta = delta.detach().requires_grad_(True)
                logits = model_fn(x + delta)
                success |= fooled(logits.detach(), delta.detach()) & active
                if bool(success[active].all()):
                    return success.numpy()
                f_y = logits.gather(1, y[:, None])[:, 0]
                other = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
                (grad,) = torch.autograd.grad((other - f_y).sum(), delta)
                gnorm = grad.flatten(1).norm(dim=1).clamp_min(1e-30).reshape(view)
                delta = project(delta.detach() + step * grad / gnorm)
    return success.numpy()
