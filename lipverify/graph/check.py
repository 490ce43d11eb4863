"""Self-check: the extracted graph must compute what the user's model computes.

Extraction is exact by construction (``graph.from_onnx``); this is the second line. The graph
(float64) and the user's model (onnxruntime / the torch module, as the file computes it) are run on
probes chosen to expose a wrong extraction:

- Gaussian inputs at scales 1e-3 .. 1e3 of the data's scale, and uniform inputs in [0, 1];
- the user's data, when given;
- inputs whose pre-activation sits just beside a breakpoint of an activation (ReLU's 0, a clip's
  bounds, ...), found by a Newton step on one neuron of the extracted graph;
- evaluated by the model as one batch and one sample at a time (batch size 1 and > 1).

Outputs are compared one by one, each with its own tolerance ``F * eps32 * M_j``, where M_j bounds
the magnitudes of the terms that make up output j (the graph as the file computes it, before exact
rewrites, run on |weights| and |x|: ``Op.magnitude``), i.e. the scale of float32 rounding for that
output, and F counts the float32 operations that round into it (``tolerance_factor``). One large logit cannot widen
the tolerance of another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from lipverify.errors import ExtractionMismatchError
from lipverify.graph.ir import Graph
from lipverify.ops.activation import Activation

EPS32 = float(np.finfo(np.float32).eps)
TOL_FACTOR = 64.0  # x eps32 x magnitude: measured worst 0.13 on the fixtures and the GLipSDP models
SCALES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3)
SINGLE_SAMPLE_PROBES = 4  # probes also evaluated one at a time
MAX_BREAKPOINT_NODES = 4
# float32 underflow: a subnormal result errs by at most 2^-149 (2^-126 where denormals are flushed to zero)
UNDERFLOW = 2.0 ** -126
ELEMENTWISE_TERMS = 64  # float operations inside one elementwise activation that may underflow, generously
OVERFLOW_LIMIT = 2.0 ** 120  # M beyond this: a float32 intermediate (max 2^128) may overflow
CHUNK_BYTES = 256 * 2**20  # memory of one chunk of a magnitude pass (float64 tensors of its widest layer)


@dataclass
class SelfCheck:
    max_abs_diff: float
    tolerance: float  # the tolerance at the probe with the largest diff / tolerance ratio
    samples: int
    worst_ratio: float = 0.0  # max over probes and outputs of |graph - model| / tolerance (< 1 passes)

    def as_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "samples": self.samples,
                "worst_ratio": self.worst_ratio}


def samples_per_chunk(graph: Graph, budget_bytes: int | None = None) -> int:
    """Samples per chunk of a pass that holds a few float64 tensors of the widest layer at once. A rule on
    the graph's shapes only, so results never depend on the machine."""
    g = file_view(graph)
    widest = max([math.prod(g.input_shape)] + [math.prod(n.out_shape) for n in g.nodes])
    budget_bytes = CHUNK_BYTES if budget_bytes is None else budget_bytes
    return max(1, budget_bytes // (8 * 8 * max(widest, 1)))  # values and magnitudes, ~4 live of each


def magnitudes(graph: Graph, x: torch.Tensor) -> torch.Tensor:
    """M >= the magnitudes of the terms summed into each output entry (float64), the scale of the file's
    float32 rounding there (see ``magnitude_pass``)."""
    return magnitude_pass(graph, x)[0]


def _underflow_floor_unit() -> float:
    """UNDERFLOW in M's units (tolerance = TOL_FACTOR * EPS32 * M at least)."""
    return UNDERFLOW / (TOL_FACTOR * EPS32)


def fits_float32(peak: torch.Tensor) -> torch.Tensor:
    """Per sample, from ``magnitude_pass``'s largest M: True where no float32 intermediate can overflow."""
    return peak <= OVERFLOW_LIMIT


def _underflow_floor(graph: Graph, node) -> float:
    """What one node adds to M for float32 underflow: an op whose result is subnormal (or flushed to zero)
    errs by up to UNDERFLOW absolutely, once per term of an output entry (at most every input entry), and
    later layers amplify it like any other error; the floor is in M's units (tolerance = TOL_FACTOR *
    EPS32 * M)."""
    terms = sum(math.prod(graph.shape_of(a)) for a in node.inputs) + ELEMENTWISE_TERMS
    return terms * _underflow_floor_unit()


def magnitude_pass(graph: Graph, x: torch.Tensor, underflow: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(M at the output, the largest M of any tensor in the graph) per sample, for inputs x.

    M bounds the magnitudes of the terms summed into each entry (the graph run on |weights| and |x|,
    ``Op.magnitude``), plus an absolute floor per node for float32 underflow: a relative rule alone
    missed (x * 1e-32) * 1e32, whose subnormal intermediate loses every digit. The largest M bounds
    every float32 intermediate of the file (a sum is at most the sum of its terms' magnitudes), so
    where it exceeds OVERFLOW_LIMIT the file may overflow and nothing is claimed about its outputs.

    Streams the graph (a tensor is dropped after its last use) in chunks of samples: keeping every
    layer of a large batch took 23 GB on a 5-conv MNIST CNN. ``underflow=False`` leaves the floors out
    (only to measure how much they add)."""
    step = samples_per_chunk(graph)
    if len(x) > step:
        parts = [magnitude_pass(graph, x[i:i + step], underflow) for i in range(0, len(x), step)]
        return torch.cat([m for m, _ in parts]), torch.cat([p for _, p in parts])
    out, peak = _file_pass(file_view(graph), x, underflow)
    if graph.output_rows is not None:  # selected logits / differences: each sums its rows' terms
        rows = graph.output_rows.abs().to(out.dtype)
        out = out.reshape(len(x), -1) @ rows.T
        if underflow:
            out = out + rows.shape[1] * _underflow_floor_unit()
        out = out.reshape((len(x),) + tuple(graph.output_shape))
    return out, peak


def file_view(graph: Graph) -> Graph:
    """The graph that does what the file does step by step (before the exact rewrites)."""
    return graph.as_file if graph.as_file is not None else graph


def tolerance_factor(graph: Graph) -> float:
    """F with |f32 - f| <= F * eps32 * M at every output: each node rounds by at most terms * eps32 times
    its own M, and later nodes carry that error no further than they carry M (their magnitude rules bound
    their slopes), so the errors add up to the sum of the nodes' terms, whatever order the file's kernels
    sum in (a fixed factor of 64 missed 2000-term dot products whose terms all round the same way). At
    least TOL_FACTOR."""
    g = file_view(graph)
    total = sum(n.op.terms(g.in_shape(n)) for n in g.nodes)
    if graph.output_rows is not None:
        total += 2 * int(graph.output_rows.shape[1])
    return float(max(TOL_FACTOR, total))


def _file_pass(graph: Graph, x: torch.Tensor, underflow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    last_use = graph.last_use()
    # an input flushed to zero (denormals-are-zero) errs by its own |x| <= UNDERFLOW
    m_in = x.abs() + (_underflow_floor_unit() if underflow else 0.0)
    values, mags = {graph.input_name: x}, {graph.input_name: m_in}
    peak = m_in.reshape(len(x), -1).amax(dim=1) if x[0].numel() else torch.zeros(len(x), dtype=x.dtype)
    for i, n in enumerate(graph.nodes):
        if n.is_merge:
            m = n.op.magnitude(*[mags[a] for a in n.inputs])
        else:
            m = n.op.magnitude(mags[n.inputs[0]], values[n.inputs[0]])
        mags[n.name] = m = (m + _underflow_floor(graph, n)) if underflow else m
        if m[0].numel():
            peak = torch.maximum(peak, m.reshape(len(x), -1).amax(dim=1))
        values[n.name] = n.op.forward(*[values[a] for a in n.inputs])
        for a in set(n.inputs):
            if last_use.get(a) == i and a != graph.output:
                del values[a], mags[a]
    return mags[graph.output], peak


def overflow_free(graph: Graph, x: torch.Tensor) -> torch.Tensor:
    """Per sample: True where no float32 intermediate of the file can overflow at x."""
    return fits_float32(magnitude_pass(graph, x)[1])


def input_domain(graph: Graph) -> float:
    """The largest power of two R such that no float32 intermediate can overflow for any input with every
    |x_i| <= R. M depends on |x| only and grows with it, so M at x = R (every entry) bounds M on the box.
    Every certified number holds on this box: beyond it the file's float32 values may be inf."""
    lo, hi = -126, 127
    box = lambda k: torch.full((1,) + tuple(graph.input_shape), 2.0 ** k, dtype=torch.float64)  # noqa: E731
    with torch.no_grad():
        if not bool(overflow_free(graph, box(lo))[0]):
            return 0.0
        while lo < hi:  # bisection on the exponent
            mid = (lo + hi + 1) // 2
            if bool(overflow_free(graph, box(mid))[0]):
                lo = mid
            else:
                hi = mid - 1
    return 2.0 ** lo


def probe_inputs(input_shape, seed: int = 0, data: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = tuple(input_shape)
    scale = 1.0
    parts = []
    if data is not None and len(data):
        data = np.asarray(data, dtype=np.float64).reshape((-1,) + shape)[:8]
        parts.append(data)
        scale = float(np.std(data)) or 1.0
    for s in SCALES:
        parts.append(s * scale * rng.standard_normal((2,) + shape))
    parts.append(rng.uniform(0.0, 1.0, (2,) + shape))
    return np.concatenate(parts)


def breakpoint_probes(graph: Graph, seed: int = 0, per_node: int = 2) -> np.ndarray:
    """Inputs whose pre-activation at one neuron of an activation node is within 1e-4 of a breakpoint."""
    acts = [n for n in graph.nodes if isinstance(n.op, Activation) and n.op.breakpoints]
    if not acts:
        return np.zeros((0,) + tuple(graph.input_shape))
    step = max(1, len(acts) // MAX_BREAKPOINT_NODES)
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for node in acts[::step][:MAX_BREAKPOINT_NODES]:
        for k in range(per_node):
            x = torch.randn((1,) + tuple(graph.input_shape), generator=gen, dtype=torch.float64)
            target = node.op.breakpoints[k % len(node.op.breakpoints)]
            for _ in range(3):  # Newton steps on the neuron nearest to the breakpoint
                x = x.detach().requires_grad_(True)
                z = graph.forward(x, keep=True)[node.inputs[0]].reshape(-1)
                i = int(torch.argmin((z - target).abs()))
                (g,) = torch.autograd.grad(z[i], x)
                gn = float((g * g).sum())
                if gn == 0:
                    break
                offset = (1e-4 if k % 2 else -1e-4) * (1 + abs(target))
                x = x - (float(z[i].detach()) - target - offset) / gn * g
            x = x.detach()
            if bool(torch.isfinite(x).all()) and float(x.abs().max()) < 1e30:  # a probe the model can evaluate
                out.append(x.numpy())
    return np.concatenate(out) if out else np.zeros((0,) + tuple(graph.input_shape))


def _refuse_underflow_amplification(graph: Graph, x: torch.Tensor, mag: np.ndarray) -> None:
    """Refuse a model whose rounding at ordinary inputs is decided by float32 underflow: there an intermediate
    leaves the float32 range downwards and is scaled back up ((x * 1e-32) * 1e32 returns 0 or a multiple of
    1e-13 for small x, steps no Lipschitz bound of the real function describes)."""
    with torch.no_grad():
        plain = magnitude_pass(graph, x, underflow=False)[0].numpy()
    if not plain.size:
        return
    floors = (mag - plain).reshape(len(x), -1).max(axis=1)
    scale = plain.reshape(len(x), -1).max(axis=1)
    worst = int(np.argmax(floors - scale))
    if floors[worst] > scale[worst]:
        raise ExtractionMismatchError(
            f"float32 underflow decides this model's outputs: on probe input {worst} its possible error "
            f"({TOL_FACTOR * EPS32 * floors[worst]:.3g}) exceeds the ordinary rounding of the outputs "
            f"({TOL_FACTOR * EPS32 * scale[worst]:.3g}) because an intermediate falls below the float32 range "
            "(~1e-38) and is scaled back up; refusing to certify")


def self_check(graph: Graph, reference: Callable[[np.ndarray], np.ndarray], seed: int = 0,
               data: np.ndarray | None = None) -> SelfCheck:
    x = probe_inputs(graph.input_shape, seed, data)
    try:
        x = np.concatenate([x, breakpoint_probes(graph, seed)])
    except (RuntimeError, ValueError):  # a graph without gradients (e.g. only pooling): skip these probes
        pass
    x32 = x.astype(np.float32)
    expected = np.asarray(reference(x32), dtype=np.float64)
    singles = [np.asarray(reference(x32[i:i + 1]), dtype=np.float64) for i in range(min(SINGLE_SAMPLE_PROBES, len(x)))]
    with torch.no_grad():
        xt = torch.from_numpy(x32.astype(np.float64))
        got = graph.forward(xt).numpy()
        mag, peak = magnitude_pass(graph, xt)
        mag = mag.numpy()
    if not bool(fits_float32(peak).all()):
        k = int(torch.argmax(peak))
        raise ExtractionMismatchError(
            f"float32 intermediates of this model may overflow on probe input {k} (max |x_i| = "
            f"{float(xt[k].abs().max()):.3g}; terms up to {float(peak[k]):.3g} inside): the file's outputs there "
            "are not the network's; refusing to certify a model that cannot be evaluated on ordinary inputs")
    if got.shape != expected.shape and got.size == expected.size and len(got) == len(expected):
        expected = expected.reshape(got.shape)  # e.g. one number per sample, given an axis by the extraction
        singles = [one.reshape((1,) + got.shape[1:]) for one in singles]
    if got.shape != expected.shape:
        raise ExtractionMismatchError(f"the extracted graph gives outputs of shape {got.shape[1:]} but the model gives "
                                      f"{expected.shape[1:]}; refusing to certify")
    if not np.all(np.isfinite(expected)):
        raise ExtractionMismatchError("the model produces NaN/Inf on probe inputs; refusing to certify")
    _refuse_underflow_amplification(graph, xt, mag)
    tol = tolerance_factor(graph) * EPS32 * mag + 1e-30
    for i, one in enumerate(singles):
        if one.shape != expected[i:i + 1].shape or not np.all(np.abs(one - expected[i:i + 1]) <= tol[i:i + 1]):
            raise ExtractionMismatchError("the model gives a different output for a sample evaluated alone than in a "
                                          "batch (its output depends on the batch); refusing to certify")
    ratio = np.abs(got - expected) / tol
    worst = float(ratio.max()) if ratio.size else 0.0
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    at = np.unravel_index(int(np.argmax(ratio)), ratio.shape) if ratio.size else None
    if not worst <= 1.0:
        raise ExtractionMismatchError(
            f"the extracted graph differs from the model by {float(np.abs(got - expected)[at]):.3g} at output "
            f"{at[1:] if len(at) > 1 else at} (tolerance there {float(tol[at]):.3g}) on probe input {int(at[0])}; "
            "refusing to certify a different network. Please report this model.")
    return SelfCheck(diff, float(tol[at]) if at is not None else 0.0, len(x), worst)
