"""The certify pipeline: load -> extract -> check -> bound -> verify -> lower bound -> result.

Everything here is importable and returns plain data; the CLI only parses arguments and renders.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

import lipverify
from lipverify.attack import lower_bound
from lipverify.bounds import METHODS, BoundContext, BoundResult, get_method
from lipverify.budget import estimate_graph, estimate_model, guard
from lipverify.errors import SoundnessError, UserInputError
from lipverify.graph.build import build_graph
from lipverify.graph.ir import Graph
from lipverify.graph.transform import select_output
from lipverify.load import LoadedModel, load_model
from lipverify.verifier import verify

if TYPE_CHECKING:
    from lipverify.robustness import DataOptions

SCHEMA_VERSION = "1.1"  # 1.1: every method entry carries the witness that `lipverify check` re-verifies


@dataclass
class CertifyOptions:
    method: str = "auto"  # a registered method name, "auto" or "all"
    output: int | None = None
    input_shape: tuple[int, ...] | None = None
    spec: str | None = None
    activation: str = "relu"
    factory: str | None = None
    graph_output: str | None = None  # the ONNX graph output to certify (--graph-output)
    device: str = "cpu"
    seed: int = 0
    max_L: float | None = None
    lower_starts: int = 16
    lower_budget_s: float = 10.0
    budget_s: float | None = None
    budget_mem: int | None = None
    method_options: dict = field(default_factory=dict)
    data: "DataOptions | None" = None  # certified radii on a dataset
    min_certified_acc: list[tuple[float, float]] = field(default_factory=list)  # (accuracy, eps) gates
    per_sample_csv: str | None = None
    reports: list[str] = field(default_factory=list)  # .html / .md audit reports
    extra_outputs: list[str] = field(default_factory=list)  # other files the caller will write (--json)


def validate_options(opts: CertifyOptions) -> None:
    if opts.lower_starts < 1:
        raise UserInputError("--lower-starts must be at least 1")
    if not 0 <= opts.seed < 2**63:
        raise UserInputError("--seed must be in [0, 2**63)")
    if not opts.lower_budget_s > 0:
        raise UserInputError("--lower-budget-s must be positive")
    if opts.budget_s is not None and not opts.budget_s > 0:
        raise UserInputError("--budget-s must be positive")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda requested but no CUDA device is available (use --device auto or cpu)")
    if device not in ("cpu", "cuda"):
        raise UserInputError(f"--device {device!r}: expected auto, cpu or cuda")
    return device


def choose_methods(graph: Graph, method: str) -> tuple[list[str], str]:
    """Which methods to run, and why (shown to the user)."""
    if method in ("all", "auto"):
        names, skipped = [], []
        for name, m in METHODS.items():
            reason = m.not_applicable(graph)
            if reason is None and method == "auto" and not getattr(m, "fits_auto", lambda g: True)(graph):
                reason = ("no tighter than the methods run (choose it with --method)" if name == "rslmi"
                          else "too large for the default budget (choose it with --method)")
            if reason is None:
                names.append(name)
            else:
                skipped.append(f"{name}: {reason}")
        why = ("auto: ran every applicable method that fits the budget and reports the tightest verified bound"
               if method == "auto" else "all: every applicable method")
        if skipped:
            why += "; skipped " + "; ".join(skipped)
        return names, why
    m = get_method(method)
    reason = m.not_applicable(graph)
    if reason:
        raise UserInputError(f"method {method!r} cannot bound this model: {reason}")
    return [method], "chosen by --method"


def versions() -> dict:
    import onnx
    import onnxruntime

    return {"lipverify": lipverify.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def certify(model_path, opts: CertifyOptions | None = None, track=None) -> dict:
    """Certify a model file; returns the certificate dict (the documented JSON schema)."""
    opts = opts or CertifyOptions()
    track = track or (lambda it, desc, total=None: it)
    validate_options(opts)
    torch.manual_seed(opts.seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    device = resolve_device(opts.device)

    model_file = Path(model_path).resolve()
    for path in [opts.per_sample_csv, *opts.reports, *opts.extra_outputs]:
        if path and Path(path).resolve() == model_file:
            raise UserInputError(f"refusing to overwrite the model file {path} with an output")
    loaded = load_model(model_path, opts.input_shape, opts.spec, opts.activation, opts.factory,
                        opts.graph_output)
    timings["load_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    guard(estimate_model(loaded.onnx_model, loaded.input_shape), opts.budget_mem, "loading this model")
    graph, check = build_graph(loaded)
    guard(estimate_graph(graph), opts.budget_mem, "bounding this model")
    timings["extract_s"] = time.perf_counter() - t
    bounded = select_output(graph, opts.output) if opts.output is not None else graph

    names, why = choose_methods(bounded, opts.method)
    ctx = BoundContext(device=device, budget_s=opts.budget_s, budget_mem=opts.budget_mem, seed=opts.seed,
                       track=track, options=dict(opts.method_options))
    results: dict[str, BoundResult] = {}
    verification: dict[str, str] = {}
    notes = list(loaded.notes)
    t = time.perf_counter()
    for name in names:
        result = METHODS[name].run(bounded, ctx)
        verification[name] = verify(bounded, result)  # raises SoundnessError if it does not hold
        results[name] = result
        notes += result.notes
    timings["bound_s"] = time.perf_counter() - t

    t = time.perf_counter()
    lb = lower_bound(bounded.forward, bounded.input_shape, starts=opts.lower_starts, seed=opts.seed,
                     budget_s=opts.lower_budget_s, data=_data_starts(opts, graph.input_shape))
    timings["lower_s"] = time.perf_counter() - t

    best = min(results.values(), key=lambda r: r.value)
    for r in results.values():
        if lb.value > r.value * (1 + 1e-9):
            raise SoundnessError(f"BUG: the sampled lower bound {lb.value:.6g} exceeds the certified bound "
                                 f"{r.value:.6g} of method {r.method}. The certificate is wrong; please report it.")

    data_summary, radii = None, None
    if opts.data is not None:
        from lipverify.robustness import evaluate

        if opts.output is not None:
            raise UserInputError("--output and --data cannot be combined: radii need the whole logit map")
        for _, eps in opts.min_certified_acc:
            if eps not in opts.data.eps:
                opts.data.eps = sorted(set(opts.data.eps) | {eps})
        t = time.perf_counter()
        # pairwise bounds: the globally tightest method and the cheap product bound
        pair_methods = list(dict.fromkeys([best.method, "product"]))
        data_summary, radii = evaluate(graph, loaded.reference, best.value, pair_methods, ctx, opts.data, track)
        timings["data_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    gates = []
    if opts.max_L is not None:
        gates.append({"name": "max-L", "threshold": opts.max_L, "value": best.value, "passed": best.value <= opts.max_L})
    for acc, eps in opts.min_certified_acc:
        if data_summary is None:
            raise UserInputError("--min-certified-acc needs --data")
        value = data_summary["certified_accuracy"][_eps_key(eps)]
        gates.append({"name": f"min-certified-acc@{eps:g}", "threshold": acc, "value": value, "passed": value >= acc,
                      "direction": ">="})

    cert = {
        "schema_version": SCHEMA_VERSION,
        "model": {"path": str(Path(model_path)), "sha256": loaded.sha256, "format": loaded.format,
                  "input_shape": list(graph.input_shape), "output_shape": list(graph.output_shape),
                  "data_files": loaded.data_files, "graph_output": loaded.graph_output},
        "method": best.method,
        "method_reason": why,
        "output": opts.output,
        "certified_bound": best.value,
        "lower_bound": lb.value,
        "ratio": lb.value / best.value if best.value > 0 else 1.0,
        "bounds": {n: r.value for n, r in results.items()},
        "layers": [l.as_dict() for l in best.layers],
        "methods": {n: {"value": r.value, "seconds": r.seconds, "check": r.check,
                        "layers": [l.as_dict() for l in r.layers], "witness": r.witness, "info": r.info}
                    for n, r in results.items()},
        "verification": verification,
        "self_check": check,
        "device": device,
        "timings": timings,
        "versions": versions(),
        "gates": gates,
        "notes": notes,
    }
    if data_summary is not None:
        cert["data"] = data_summary
    write_outputs(cert, radii, opts)
    return cert


def _eps_key(eps: float) -> str:
    from lipverify.radii import _eps_key as key

    return key(eps)


def write_outputs(cert: dict, radii, opts: CertifyOptions) -> None:
    """Per-sample CSV and audit reports (all written atomically; ``certify`` has already refused any
    output path that names the model file)."""
    if opts.per_sample_csv:
        if radii is None:
            raise UserInputError("--per-sample needs --data")
        from lipverify.radii import write_csv

        write_csv(radii, opts.data.eps, opts.per_sample_csv)
    for path in opts.reports:
        suffix = Path(path).suffix.lower()
        if suffix in (".html", ".htm"):
            from lipverify.report.html import write_html

            write_html(cert, path)
        elif suffix in (".md", ".markdown"):
            from lipverify.report.markdown import write_markdown

            write_markdown(cert, path)
        else:
            raise UserInputError(f"--report {path}: expected a .html or .md file name")


def _data_starts(opts: CertifyOptions, input_shape) -> torch.Tensor | None:
    """The first samples of --data, used as extra starting points of the lower-bound search."""
    if opts.data is None:
        return None
    from lipverify.data import iter_batches

    for x, _ in iter_batches(opts.data.spec, tuple(input_shape)):
        return x[: opts.lower_starts]
    return None


def gates_passed(cert: dict) -> bool:
    return all(g["passed"] for g in cert.get("gates", []))


def inspect(model_path, opts: CertifyOptions | None = None) -> dict:
    """The extracted graph, for ``lipverify inspect``."""
    opts = opts or CertifyOptions()
    from lipverify.errors import UnsupportedModelError

    loaded = load_model(model_path, opts.input_shape, opts.spec, opts.activation, opts.factory,
                        opts.graph_output)
    try:
        graph, check = build_graph(loaded)
    except UnsupportedModelError as exc:  # still show the model and every unsupported node at once
        return {"model": {"path": str(model_path), "format": loaded.format, "sha256": loaded.sha256},
                "supported": False, "onnx_nodes": exc.onnx_nodes, "notes": loaded.notes,
                "problems": [{"op": p.op_type, "node": p.node_name, "why": str(p).split(": ", 1)[-1]}
                             for p in exc.problems]}
    rows = graph.summary_rows()
    for row, node in zip(rows, graph.nodes):
        row["inputs"] = [i if i != graph.input_name else "input" for i in node.inputs]
        row["kind"] = node.op.kind
        slopes = getattr(node.op, "slopes", None)
        row["slopes"] = list(slopes) if slopes is not None else None
    return {"model": {"path": str(model_path), "format": loaded.format, "sha256": loaded.sha256,
                      "input_shape": list(graph.input_shape), "output_shape": list(graph.output_shape),
                      "graph_output": loaded.graph_output},
            "nodes": rows, "self_check": check, "notes": loaded.notes,
            "chain": graph.is_chain(), "supported": True,
            "methods": {n: (m.not_applicable(graph) or "applicable") for n, m in METHODS.items()},
            "n_parameters": int(sum(math.prod(t.shape) for n in graph.nodes for t in vars(n.op).values()
                                    if isinstance(t, torch.Tensor)))}
