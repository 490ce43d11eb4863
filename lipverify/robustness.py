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
from lipverify.data import DataSpec, check_labels, count_samples, data_sha256, iter_batches, sample_indices
from lipverify.errors import SoundnessError, UserInputError
from lipverify.graph.ir import Graph
from lipverify.graph.transform import output_dim, pairwise_difference
from lipverify.radii import (TOLERANCE_RULE, RadiiResult, compute_radii, logit_tolerances, model_logits,
                             pgd_inside_radius, summarize)
from lipverify.verifier import verify

MAX_PAIRWISE_CLASSES = 32  # C (C-1) / 2 pairwise certificates; beyond this use the global form only


@dataclass
class DataOptions:
    spec: DataSpec
    eps: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5])
    pairwise: bool = True
    attack_samples: int = 32  # certified points re-attacked by PGD inside their radius
    attack_steps: int = 30


def pair_methods(graph: Graph, method_names: list[str], n_pairs: int, device: str = "cpu") -> tuple[list[str], list[str]]:
    """The methods run on every logit difference, by a rule on the network (never on measured time):
    a method whose work over all pairs exceeds its size rule is replaced by its ``pair_fallback``."""
    chosen, replaced = [], []
    for name in method_names:
        method = METHODS[name]
        if not method.fits_pairs(graph, n_pairs, device) and method.pair_fallback:
            replaced.append(f"{name} -> {method.pair_fallback} ({n_pairs} pairs exceed {name}'s size rule)")
            name = method.pair_fallback
        if name not in chosen:
            chosen.append(name)
    return chosen, replaced


def pairwise_bounds(graph: Graph, method_names: list[str], ctx: BoundContext, track) -> tuple[np.ndarray, dict]:
    """Symmetric matrix of certified bounds on Lip(f_i - f_j) (the best verified method per pair).

    Every pair runs the same methods (``pair_methods``), so the result depends only on the network
    and the options. The pairs share the network up to the last layer, and the methods use that
    through ``ctx.cache``: LipSDP warm-starts from a path point of the whole-output solve, the
    compositional tier and the per-layer norms reuse their hidden-layer work.
    """
    c = output_dim(graph)
    L = np.full((c, c), np.inf)
    np.fill_diagonal(L, 0.0)
    used: dict = {}
    certificates: dict[str, dict] = {}  # "i,j" -> the verified certificate of Lip(f_i - f_j)
    pairs = [(i, j) for i in range(c) for j in range(i + 1, c)]
    names, replaced = pair_methods(graph, method_names, len(pairs), ctx.device)
    for i, j in track(pairs, "pairwise bounds", len(pairs)):
        g = pairwise_difference(graph, i, j)
        best, best_name, best_witness = math.inf, None, None
        for name in names:
            method = METHODS[name]
            if method.not_applicable(g):
                continue
            result = method.run(g, ctx)
            verify(g, result)
            if result.value < best:
                best, best_name, best_witness = result.value, name, result.witness
        L[i, j] = L[j, i] = best
        used[best_name] = used.get(best_name, 0) + 1
        certificates[f"{i},{j}"] = {"method": best_name, "value": best, "witness": best_witness}
    if replaced:
        used["replaced_by_size_rule"] = replaced
    used["certificates"] = certificates
    return L, used


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

    L_pair, used = None, {}
    if opts.pairwise and n_classes <= MAX_PAIRWISE_CLASSES:
        L_pair, used = pairwise_bounds(graph, method_names, ctx, track)
    # the file's float32 rounding, bounded per sample over the ball its radius will claim
    inputs = (x.numpy() for x, _ in track(iter_batches(opts.spec, shape), "rounding allowance per sample", n_batches))
    tol, reach = logit_tolerances(graph, inputs, logits_arr, labels, L_global, L_pair)
    result = compute_radii(logits_arr, labels, L_global, L_pair, opts.eps, index=sample_indices(opts.spec),
                           logit_tol=tol, max_radius=reach)
    summary = summarize(result, opts.eps)
    certificates = used.pop("certificates", {}) if used else {}
    summary.update({"path": str(opts.spec.path), "sha256": data_sha256(opts.spec.path), "L_global": L_global,
                    "logit_tolerance": float(tol.max()), "logit_tolerance_rule": TOLERANCE_RULE, "eps": [float(e) for e in opts.eps], "pairwise_methods": used,
                    "spec": {k: getattr(opts.spec, k) for k in ("x_key", "y_key", "label_column", "transform",
                                                                "limit", "seed", "batch_size")},
                    "pairwise_certificates": certificates})
    if L_pair is not None:
        summary["L_pairwise"] = [[None if not math.isfinite(v) else float(v) for v in row] for row in L_pair]

    summary["pgd_check"] = sanity_attack(graph, np.concatenate(xs) if xs else np.zeros((0,) + shape),
                                         result, opts, track, reference=reference)
    summary["seconds"] = time.perf_counter() - t0
    return summary, result


def sanity_attack(graph: Graph, x_head: np.ndarray, result: RadiiResult, opts: DataOptions, track,
                  reference=None) -> dict:
    """PGD inside the certified radius of some certified points: a success is a soundness bug.

    The graph's gradients propose the points; with ``reference`` (the user's file) the file's own
    prediction there decides success, so a wrong extraction cannot hide a flip. Any flip counts: the
    radii already allow for the file's rounding at x and at every point of the ball."""
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
                                judge=judge, judge_tol=0.0)
    n_success = int(np.sum(success))
    if n_success:
        raise SoundnessError(f"BUG: a PGD attack changed the prediction of {n_success} sample(s) inside their "
                             "certified radius. The certificate is wrong; please report this model.")
    return {"attacked": int(len(idx)), "successes": 0, "steps": opts.attack_steps,
            "judged_by": "the model file" if judge is not None else "the extracted graph"}
