"""Certified radii on the user's data: pairwise bounds, margins from the original model, a PGD check.

The margins come from the user's model as its file computes it (onnxruntime / the torch module, in
float32); we allow for float32 rounding of the logits with an explicit tolerance subtracted from every
logit difference. Radii come from certified bounds only (the global L, and pairwise L_yj when the
output has few enough classes).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from lipverify.bounds import METHODS, BoundContext
from lipverify.data import DataSpec, check_labels, count_samples, iter_batches, sample_indices
from lipverify.errors import SoundnessError, UserInputError
from lipverify.graph.ir import Graph
from lipverify.graph.transform import output_dim, pairwise_difference
from lipverify.radii import RadiiResult, compute_radii, pgd_inside_radius, summarize
from lipverify.verifier import verify

# float32 logits: relative rounding allowance (|error| <= LOGIT_REL_TOL * (1 + |logit|_max)), generous
LOGIT_REL_TOL = 1e-5
MAX_PAIRWISE_CLASSES = 32
PAIRWISE_BUDGET_S = 60.0  # methods projected to take longer over all pairs are skipped for pairs  # C (C-1) / 2 pairwise certificates; beyond this use the global form only


@dataclass
class DataOptions:
    spec: DataSpec
    eps: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5])
    pairwise: bool = True
    attack_samples: int = 32  # certified points re-attacked by PGD inside their radius
    attack_steps: int = 30


def pairwise_bounds(graph: Graph, method_names: list[str], ctx: BoundContext, track,
                    budget_s: float = PAIRWISE_BUDGET_S) -> tuple[np.ndarray, dict]:
    """Symmetric matrix of certified bounds on Lip(f_i - f_j) (the best verified method per pair).

    Each method is timed on the first pair; a method whose projected time over all pairs exceeds
    ``budget_s`` is dropped for the remaining pairs (the pairs it did bound keep its value).
    """
    c = output_dim(graph)
    L = np.full((c, c), np.inf)
    np.fill_diagonal(L, 0.0)
    used: dict[str, int] = {}
    pairs = [(i, j) for i in range(c) for j in range(i + 1, c)]
    active = list(method_names)
    dropped: list[str] = []
    for k, (i, j) in enumerate(track(pairs, "pairwise bounds", len(pairs))):
        g = pairwise_difference(graph, i, j)
        best, best_name = math.inf, None
        for name in list(active):
            method = METHODS[name]
            if method.not_applicable(g):
                continue
            t = time.perf_counter()
            result = method.run(g, ctx)
            verify(g, result)
            if k == 0 and len(active) > 1 and (time.perf_counter() - t) * len(pairs) > budget_s:
                active.remove(name)
                dropped.append(name)
            if result.value < best:
                best, best_name = result.value, name
        L[i, j] = L[j, i] = best
        used[best_name] = used.get(best_name, 0) + 1
    if dropped:
        used["dropped_for_time"] = dropped
    return L, used


def model_logits(reference, x: np.ndarray) -> np.ndarray:
    return np.asarray(reference(x.astype(np.float32)), dtype=np.float64).reshape(len(x), -1)


def evaluate(graph: Graph, reference, L_global: float, method_names: list[str], ctx: BoundContext,
             opts: DataOptions, track) -> tuple[dict, RadiiResult]:
    t0 = time.perf_counter()
    shape = tuple(graph.input_shape)
    n_classes = output_dim(graph)
    if n_classes < 2:
        raise UserInputError("certified radii need a classifier with at least 2 outputs")
    if any(e < 0 or not math.isfinite(e) for e in opts.eps):
        raise UserInputError(f"--eps values must be finite and >= 0, got {opts.eps}")
    xs, ys, logits = [], [], []
    total = count_samples(opts.spec)
    batches = iter_batches(opts.spec, shape)
    n_batches = None if total is None else max(1, -(-total // opts.spec.batch_size))
    for x, y in track(batches, "model outputs on data", n_batches):
        check_labels(y.numpy(), n_classes)
        logits.append(model_logits(reference, x.numpy()))
        ys.append(y.numpy())
        if len(xs) * opts.spec.batch_size < max(opts.attack_samples, 1) * 4:
            xs.append(x.numpy())
    if not ys:
        raise UserInputError(f"{opts.spec.path}: the dataset is empty")
    logits_arr, labels = np.concatenate(logits), np.concatenate(ys)
    tol = LOGIT_REL_TOL * (1.0 + float(np.abs(logits_arr).max()))

    L_pair, used = None, {}
    if opts.pairwise and n_classes <= MAX_PAIRWISE_CLASSES:
        L_pair, used = pairwise_bounds(graph, method_names, ctx, track)
    result = compute_radii(logits_arr, labels, L_global, L_pair, opts.eps, index=sample_indices(opts.spec),
                           logit_tol=tol)
    summary = summarize(result, opts.eps)
    summary.update({"path": str(opts.spec.path), "L_global": L_global, "logit_tolerance": tol,
                    "pairwise_methods": used})
    if L_pair is not None:
        summary["L_pairwise"] = [[None if not math.isfinite(v) else float(v) for v in row] for row in L_pair]

    summary["pgd_check"] = sanity_attack(graph, np.concatenate(xs) if xs else np.zeros((0,) + shape),
                                         result, opts, track, reference=reference, logit_tol=tol)
    summary["seconds"] = time.perf_counter() - t0
    return summary, result


def sanity_attack(graph: Graph, x_head: np.ndarray, result: RadiiResult, opts: DataOptions, track,
                  reference=None, logit_tol: float = 0.0) -> dict:
    """PGD inside the certified radius of some certified points: a success is a soundness bug.

    The graph's gradients propose the points; with ``reference`` (the user's file) the file's own
    prediction there decides success, so a wrong extraction cannot hide a flip."""
    k = min(len(x_head), opts.attack_samples)
    idx = np.nonzero(result.radius[:k] > 0)[0]
    if len(idx) == 0 or opts.attack_samples <= 0:
        return {"attacked": 0, "successes": 0}
    x = torch.from_numpy(x_head[idx].astype(np.float64))
    y = torch.from_numpy(result.label[idx])
    radius = torch.from_numpy(result.radius[idx])
    judge = None
    if reference is not None:
        from lipverify.attack.evaluate import FileModel

        judge = FileModel(reference, graph.input_shape)
    success = pgd_inside_radius(graph.forward, x, y, radius, steps=opts.attack_steps, restarts=1, seed=0,
                                judge=judge, judge_tol=logit_tol)
    n_success = int(np.sum(success))
    if n_success:
        raise SoundnessError(f"BUG: a PGD attack changed the prediction of {n_success} sample(s) inside their "
                             "certified radius. The certificate is wrong; please report this model.")
    return {"attacked": int(len(idx)), "successes": 0, "steps": opts.attack_steps,
            "judged_by": "the model file" if judge is not None else "the extracted graph"}
