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
from lipverify.graph.check import input_domain
from lipverify.graph.ir import Graph
from lipverify.graph.transform import select_output
from lipverify.load import load_model
from lipverify.load.identity import architecture_identity
from lipverify.progress import as_progress
from lipverify.timebudget import TimeBudget
from lipverify.verifier import verify

if TYPE_CHECKING:
    from lipverify.robustness import DataOptions

# 1.1: every method entry carries the witness that `lipverify check` re-verifies. Later additions
# (the `run` audit block, merge rows and `cumulative` in `layers`, data `sha256`) are new keys only.
SCHEMA_VERSION = "1.1"
DOMAIN_NOTE = 1e6  # a note when float32 overflow limits the inputs the certificate speaks of to below this
REPORT_SUFFIXES = {".html": "html", ".htm": "html", ".md": "md", ".markdown": "md"}
FAST_METHOD = "product"  # --fast: the certified bound that takes seconds even on large models


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
    lower_starts: int | None = None  # gradient-ascent starts of the lower bound (None: by model size)
    lower_effort: float = 1.0  # multiplies every count of the lower-bound search
    lower_budget_s: float | None = None  # optional wall-clock cap of the lower-bound search
    budget_s: float | None = None
    budget_mem: int | None = None
    method_options: dict = field(default_factory=dict)
    data: "DataOptions | None" = None  # certified radii on a dataset
    min_certified_acc: list[tuple[float, float]] = field(default_factory=list)  # (accuracy, eps) gates
    per_sample_csv: str | None = None
    reports: list[str] = field(default_factory=list)  # .html / .md audit reports
    extra_outputs: list[str] = field(default_factory=list)  # other files the caller will write (--json)
    fast: bool = False  # --fast: the product bound only (global and pairwise)
    command: str | None = None  # the command line, for the audit trail (default: sys.argv)


def validate_options(opts: CertifyOptions) -> None:
    if opts.lower_starts is not None and opts.lower_starts < 1:
        raise UserInputError("--lower-starts must be at least 1")
    if not (math.isfinite(opts.lower_effort) and 0 < opts.lower_effort <= 1000):
        raise UserInputError("--lower-effort must be in (0, 1000]")
    if not 0 <= opts.seed < 2**63:
        raise UserInputError("--seed must be in [0, 2**63)")
    if opts.lower_budget_s is not None and not opts.lower_budget_s > 0:
        raise UserInputError("--lower-budget-s must be positive")
    if opts.budget_s is not None and not opts.budget_s > 0:
        raise UserInputError("--budget-s must be positive")
    if opts.fast and opts.method != "auto":
        raise UserInputError(f"--fast chooses the methods itself; drop --method {opts.method} or --fast")


def check_outputs(model_path, opts: CertifyOptions) -> None:
    """Refuse bad output paths before any work: the model file itself, a report that is neither
    .html nor .md, --per-sample without --data, a directory, or a folder that cannot be written."""
    from lipverify.fileio import check_writable

    model_file = Path(model_path).resolve()
    for path in [opts.per_sample_csv, *opts.reports, *opts.extra_outputs]:
        if path and Path(path).resolve() == model_file:
            raise UserInputError(f"refusing to overwrite the model file {path} with an output")
    for path in opts.reports:
        if Path(path).suffix.lower() not in REPORT_SUFFIXES:
            raise UserInputError(f"--report {path}: expected a .html or .md file name")
    if opts.per_sample_csv and opts.data is None:
        raise UserInputError("--per-sample needs --data")
    if opts.min_certified_acc and opts.data is None:
        raise UserInputError("--min-certified-acc needs --data")
    if opts.output is not None and opts.data is not None:
        raise UserInputError("--output and --data cannot be combined: radii need the whole logit map")
    for path in [opts.per_sample_csv, *opts.reports, *opts.extra_outputs]:
        if path:
            check_writable(path)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda requested but no CUDA device is available (use --device auto or cpu)")
    if device not in ("cpu", "cuda"):
        raise UserInputError(f"--device {device!r}: expected auto, cpu or cuda")
    return device


def choose_methods(graph: Graph, method: str, device: str = "cpu", fast: bool = False) -> tuple[list[str], str]:
    """Which methods to run, and why (shown to the user). ``auto``'s choices are rules on the
    network (its structure and sizes, the device), never on measured time."""
    if fast:
        return [FAST_METHOD], (f"--fast: {FAST_METHOD} only (certified, seconds even on large models; "
                               "drop --fast for the tighter methods)")
    if method in ("all", "auto"):
        names, skipped = [], []
        for name, m in METHODS.items():
            reason = m.not_applicable(graph)
            if reason is None and method == "auto" and not m.fits_auto(graph, device):
                reason = ("no tighter than the methods run (choose it with --method)" if name == "rslmi"
                          else "too large for auto's size rule (choose it with --method)")
            if reason is None:
                names.append(name)
            else:
                skipped.append(f"{name}: {reason}")
        if method == "auto":
            for name in list(names):
                better = [b for b in METHODS[name].auto_superseded_by if b in names]
                if better:
                    names.remove(name)
                    skipped.append(f"{name}: {better[0]} runs on this dense chain and is at least as tight "
                                   "(choose it with --method)")
        why = ("auto: ran every applicable method within auto's size rules and reports the tightest verified bound"
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
    """Certify a model file; returns the certificate dict (the documented JSON schema).

    ``track``: a ``lipverify.progress.Progress`` (or a bare ``track(iterable, description, total)``
    function) that shows progress; it never changes a result.
    """
    opts = opts or CertifyOptions()
    progress = as_progress(track)
    validate_options(opts)
    check_outputs(model_path, opts)
    options = _options_record(opts)
    torch.manual_seed(opts.seed)
    budget = TimeBudget(opts.budget_s)  # the one budget of the whole run; unlimited by default
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    device = resolve_device(opts.device)

    with progress.stage("load model"):
        loaded = load_model(model_path, opts.input_shape, opts.spec, opts.activation, opts.factory,
                            opts.graph_output)
    timings["load_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    with progress.stage("extract graph + self-check"):
        guard(estimate_model(loaded.onnx_model, loaded.input_shape), opts.budget_mem, "loading this model")
        graph, check = build_graph(loaded)
        guard(estimate_graph(graph), opts.budget_mem, "bounding this model")
        domain = input_domain(graph)
    timings["extract_s"] = time.perf_counter() - t
    bounded = select_output(graph, opts.output) if opts.output is not None else graph

    names, why = choose_methods(bounded, opts.method, device, opts.fast)
    ctx = BoundContext(device=device, time_budget=budget, budget_mem=opts.budget_mem, seed=opts.seed,
                       track=progress, status=progress.status, options=dict(opts.method_options))
    results: dict[str, BoundResult] = {}
    verification: dict[str, str] = {}
    notes = list(loaded.notes)
    if domain < DOMAIN_NOTE:
        notes.append(f"float32 intermediates of this model can overflow for inputs with some |x_i| > {domain:.6g}: "
                     f"every certified number holds for inputs with all |x_i| <= {domain:.6g} (model.max_abs_input)")
    t = time.perf_counter()
    for name in names:
        # the first method (product under auto/all) always runs: a certificate always comes out
        if results and budget.expired(f"{name}: not run (--budget-s spent before it started)"):
            continue
        with progress.stage(f"bound: {name}"):
            result = METHODS[name].run(bounded, ctx)
            verification[name] = verify(bounded, result)  # raises SoundnessError if it does not hold
        results[name] = result
        timings[f"bound_{name}_s"] = result.seconds
        notes += result.notes
    timings["bound_s"] = time.perf_counter() - t

    t = time.perf_counter()
    lower_cap, capped_by_total = opts.lower_budget_s, False
    if budget.limited:  # the lower-bound search gets at most what is left of --budget-s
        left = max(budget.left(), 1e-3)
        if lower_cap is None or left < lower_cap:
            lower_cap, capped_by_total = left, True
    with progress.stage("sampled lower bound"):
        # measured on the user's file; the graph and the torch module only propose where to look
        lb = lower_bound(loaded, bounded, output=opts.output, seed=opts.seed, effort=opts.lower_effort,
                         starts=opts.lower_starts, budget_s=lower_cap,
                         data=_data_starts(opts, graph.input_shape), track=progress)
    timings["lower_s"] = time.perf_counter() - t
    if lb.cut_by_budget:
        cap = "what was left of --budget-s" if capped_by_total else f"--lower-budget-s {opts.lower_budget_s:g}"
        cut = (f"sampled lower bound: {cap} ({lower_cap:.3g} s) cut the search during "
               f"'{lb.cut_by_budget}' after {lb.evaluations} evaluations of the model")
        budget.cut(cut)  # a time cut: listed with the others in run.cut_by_budget
        notes.append(cut)

    best = min(results.values(), key=lambda r: r.value)
    for r in results.values():
        if lb.value > r.value * (1 + 1e-9):
            raise SoundnessError(f"BUG: the sampled lower bound {lb.value:.6g} exceeds the certified bound "
                                 f"{r.value:.6g} of method {r.method}: the model file itself stretches a pair of "
                                 f"inputs (found by {lb.found_by}; stored under lower_bound_search in --json) "
                                 "by more than the certificate allows. The certificate is wrong; please report it.")

    data_summary, radii = None, None
    if opts.data is not None:
        from lipverify.robustness import evaluate

        for _, eps in opts.min_certified_acc:
            if eps not in opts.data.eps:
                opts.data.eps = sorted(set(opts.data.eps) | {eps})
        t = time.perf_counter()
        # pairwise bounds: the globally tightest method and the cheap product bound
        pair_methods = list(dict.fromkeys([best.method, "product"]))
        if len(pair_methods) > 1 and budget.expired(f"pairwise radii: {best.method} not run for class pairs, "
                                                    "product only (--budget-s spent)"):
            pair_methods = ["product"]
        data_summary, radii = evaluate(graph, loaded.reference, best.value, pair_methods, ctx, opts.data, progress)
        timings["data_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    gates = []
    if opts.max_L is not None:
        gates.append({"name": "max-L", "threshold": opts.max_L, "value": best.value, "passed": best.value <= opts.max_L})
    for acc, eps in opts.min_certified_acc:
        value = data_summary["certified_accuracy"][_eps_key(eps)]
        gates.append({"name": f"min-certified-acc@{eps:g}", "threshold": acc, "value": value, "passed": value >= acc,
                      "direction": ">=", "radius_form": data_summary.get("form")})

    from lipverify.audit import run_record

    run = run_record(device, options, opts.command)
    run["budget_s"] = opts.budget_s
    run["cut_by_budget"] = budget.cuts
    cert = {
        "schema_version": SCHEMA_VERSION,
        "model": {"path": str(Path(model_path)), "sha256": loaded.sha256, "format": loaded.format,
                  "input_shape": list(graph.input_shape), "output_shape": list(graph.output_shape),
                  "data_files": loaded.data_files, "graph_output": loaded.graph_output,
                  "architecture": architecture_identity(loaded, opts.factory),
                  # the box on which no float32 intermediate can overflow: every number below holds on it
                  "max_abs_input": domain},
        "method": best.method,
        "method_reason": why,
        "output": opts.output,
        "certified_bound": best.value,
        "lower_bound": lb.value,
        "lower_bound_search": lb.as_dict(),
        "ratio": lb.value / best.value if best.value > 0 else 1.0,
        "bounds": {n: r.value for n, r in results.items()},
        "layers": [l.as_dict() for l in best.layers],
        "methods": {n: {"value": r.value, "seconds": r.seconds, "check": r.check, "solver": r.solver,
                        "layers": [l.as_dict() for l in r.layers], "witness": r.witness, "info": r.info}
                    for n, r in results.items()},
        "verification": verification,
        "self_check": check,
        "device": device,
        "timings": timings,
        "versions": versions(),
        "run": run,
        "gates": gates,
        "notes": notes,
    }
    if data_summary is not None:
        cert["data"] = data_summary
    write_outputs(cert, radii, opts)
    return cert


def _options_record(opts: CertifyOptions) -> dict:
    """The options that shaped the result (the audit trail's ``options``)."""
    record = {"method": opts.method, "fast": opts.fast, "output": opts.output,
              "input_shape": list(opts.input_shape) if opts.input_shape else None, "spec": opts.spec,
              "activation": opts.activation, "factory": opts.factory, "device": opts.device, "seed": opts.seed,
              "max_L": opts.max_L, "lower_starts": opts.lower_starts, "lower_effort": opts.lower_effort, "lower_budget_s": opts.lower_budget_s,
              "budget_s": opts.budget_s, "budget_mem": opts.budget_mem, **opts.method_options,
              "min_certified_acc": [{"accuracy": a, "eps": e} for a, e in opts.min_certified_acc]}
    if opts.data is not None:
        spec = opts.data.spec
        record["data"] = {"path": str(spec.path), "eps": list(opts.data.eps), "x_key": spec.x_key,
                          "y_key": spec.y_key, "label_column": spec.label_column, "transform": spec.transform,
                          "limit": spec.limit, "batch_size": spec.batch_size, "pairwise": opts.data.pairwise}
    return record


def _eps_key(eps: float) -> str:
    from lipverify.radii import _eps_key as key

    return key(eps)


def write_outputs(cert: dict, radii, opts: CertifyOptions) -> None:
    """Per-sample CSV and audit reports (all written atomically; ``check_outputs`` has already
    checked every path)."""
    if opts.per_sample_csv:
        from lipverify.radii import write_csv

        write_csv(radii, opts.data.eps, opts.per_sample_csv)
    for path in opts.reports:
        write_report(cert, path)


def write_report(cert: dict, path, kind: str | None = None) -> None:
    """An HTML or Markdown report (``kind`` "html"/"md", default: by the file's suffix)."""
    kind = kind or REPORT_SUFFIXES.get(Path(path).suffix.lower())
    if kind == "html":
        from lipverify.report.html import write_html

        write_html(cert, path)
    elif kind == "md":
        from lipverify.report.markdown import write_markdown

        write_markdown(cert, path)
    else:
        raise UserInputError(f"{path}: expected a .html or .md file name")


def _data_starts(opts: CertifyOptions, input_shape) -> torch.Tensor | None:
    """The first samples of --data, used as extra starting points of the lower-bound search."""
    if opts.data is None:
        return None
    from lipverify.data import iter_batches

    for x, _ in iter_batches(opts.data.spec, tuple(input_shape)):
        return x[: opts.lower_starts or 32]
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
