"""``lipverify check CERT MODEL [--data FILE]``: re-verify a certificate file against a model file.

An auditor's command. Nothing in the certificate is trusted except as a claim to be checked:

1. the model file's sha256 (and its external data files) must match;
2. the graph is re-extracted from the file and self-checked against the file's own runtime;
3. every method's witness is re-checked by this package's checkers (float64 Cholesky and closed
   forms; no solver, no randomness), and each method's value must be the bound its witness implies;
4. the headline ``certified_bound`` must be the smallest verified value, the reported ``method`` the one
   that gave it, ``bounds`` and ``ratio`` consistent, the lower bound not above it, and every gate's
   verdict recomputed;
5. results on data (certified accuracy, radii, their gates) are recomputed from the data file (its
   sha256 must match): margins from the model file, every pairwise bound's witness re-checked. Without
   ``--data`` they are reported as not verified and the check fails, unless ``--ignore-data``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from lipverify.errors import SoundnessError, UserInputError

SUPPORTED_SCHEMAS = {"1.1"}
IMPLIED_REL = 1e-9  # a method's value must equal the bound its witness implies to this relative precision


class CertificateInvalid(Exception):
    """The certificate does not hold for this model file, or claims what was not verified (exit 1)."""


@dataclass
class CheckReport:
    steps: list[tuple[str, str]] = field(default_factory=list)  # (step, outcome)
    unverified: list[str] = field(default_factory=list)  # claims that were not checked (--ignore-data)
    informational: list[str] = field(default_factory=list)  # entries describing the run, not verified

    def passed(self, step: str, detail: str = "ok") -> None:
        self.steps.append((step, detail))


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise CertificateInvalid(f"{what} = {value!r} is not a finite number")
    return float(value)


def read_certificate(path) -> dict:
    from lipverify.fileio import read_json_object

    path = Path(path)
    cert = read_json_object(path, "certificate file")
    version = cert.get("schema_version")
    if not isinstance(version, str) or version not in SUPPORTED_SCHEMAS:
        raise UserInputError(f"{path}: schema_version {version!r} is not checkable (need one of "
                             f"{sorted(SUPPORTED_SCHEMAS)}; re-certify with this lipverify)")
    expected = {"model": dict, "certified_bound": (int, float), "methods": dict, "method": str}
    for key, kind in expected.items():
        if not isinstance(cert.get(key), kind) or isinstance(cert.get(key), bool):
            raise UserInputError(f"{path}: the certificate's {key!r} entry is missing or of the wrong type")
    if not cert["methods"] or not all(isinstance(v, dict) for v in cert["methods"].values()):
        raise UserInputError(f"{path}: the certificate lists no methods")
    if not isinstance(cert.get("bounds", {}), dict) or not isinstance(cert["model"].get("data_files") or {}, dict):
        raise UserInputError(f"{path}: the certificate's bounds/data_files entries are malformed")
    output = cert.get("output")
    if output is not None and (not isinstance(output, int) or isinstance(output, bool)):
        raise UserInputError(f"{path}: the certificate's 'output' entry must be an integer or null")
    shape = cert["model"].get("input_shape")
    if shape is not None and (not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape)):
        raise UserInputError(f"{path}: the certificate's input_shape is malformed")
    if "data" in cert and not isinstance(cert["data"], dict):
        raise UserInputError(f"{path}: the certificate's data entry is malformed")
    if not isinstance(cert.get("gates", []), list):
        raise UserInputError(f"{path}: the certificate's gates entry is malformed")
    return cert


def _verify_entry(graph, name: str, entry: dict) -> tuple[float, str]:
    """(value, what passed) for one method entry; CertificateInvalid unless its witness implies its value."""
    from lipverify.verifier import verify_implied

    value = _number(entry.get("value"), f"method {name}: value")
    witness = entry.get("witness")
    if not isinstance(witness, dict):
        raise CertificateInvalid(f"method {name}: no witness in the certificate")
    try:
        implied, detail = verify_implied(graph, SimpleNamespace(method=name, value=value, witness=witness))
    except SoundnessError as exc:
        raise CertificateInvalid(f"method {name}: {exc}")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        raise CertificateInvalid(f"method {name}: malformed witness ({type(exc).__name__}: {exc})")
    if implied is not None and value > implied * (1 + IMPLIED_REL) + 1e-300:
        raise CertificateInvalid(f"method {name}: claims {value!r} but its witness implies {implied!r}")
    return value, detail


def check_certificate(cert_path, model_path, input_shape=None, spec=None, activation="relu", factory=None,
                      data_path=None, ignore_data: bool = False, graph_output: str | None = None) -> CheckReport:
    """Raise CertificateInvalid when the certificate does not hold; UserInputError for bad input."""
    from lipverify.graph.build import build_graph
    from lipverify.graph.transform import select_output
    from lipverify.load import load_model
    from lipverify.load.identity import architecture_identity, identity_differences
    from lipverify.load.model import sha256_file

    cert = read_certificate(cert_path)
    report = CheckReport()
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserInputError(f"{model_path}: no such model file")
    if data_path is not None and "data" not in cert:
        raise UserInputError("--data given but the certificate claims no results on data")
    if cert.get("output") is not None and "data" in cert:
        raise CertificateInvalid("the certificate bounds one output only (output "
                                 f"{cert['output']}) but claims radii, which need the whole logit map")

    digest = sha256_file(model_path)
    if digest != cert["model"].get("sha256"):
        raise CertificateInvalid(f"file hash mismatch: the certificate is for sha256 {cert['model'].get('sha256')}, "
                                 f"{model_path} has {digest}")
    for name, expected in (cert["model"].get("data_files") or {}).items():
        data = model_path.parent / str(name)
        if not data.is_file() or sha256_file(data) != expected:
            raise CertificateInvalid(f"external data file {name} does not match the certificate")
    report.passed("model file sha256", digest[:16] + "…")

    shape = input_shape or tuple(cert["model"].get("input_shape") or ()) or None
    claimed_output = cert["model"].get("graph_output")
    if claimed_output is not None and not isinstance(claimed_output, str):
        raise UserInputError(f"{cert_path}: the certificate's graph_output entry is malformed")
    if graph_output is not None and graph_output != claimed_output:
        raise CertificateInvalid(f"the certificate is about graph output {claimed_output!r}, not {graph_output!r}")
    # without a graph_output entry (older certificates) only a single-output ONNX file loads
    loaded = load_model(model_path, shape, spec, activation, factory, claimed_output)
    if loaded.graph_output is not None:
        report.passed("graph output", f"{loaded.graph_output!r} (the output the certificate names)")
    recorded = cert["model"].get("architecture")
    if not isinstance(recorded, dict):
        raise CertificateInvalid("the certificate does not record the model's architecture (spec, factory code): "
                                 "it was made by an older lipverify; certify the model again")
    differences = identity_differences(recorded, architecture_identity(loaded, factory))
    if differences:
        raise CertificateInvalid("the model is not built the way it was certified (pass the same --spec, "
                                 "--activation and --factory as certify, with unchanged code): " + "; ".join(differences))
    report.passed("architecture", ", ".join(f"{k} {str(v)[:16]}" for k, v in recorded.items() if k != "factory_sources")
                  + (f", {len(recorded['factory_sources'])} factory source file(s) hashed" if "factory_sources" in recorded else ""))
    graph, check = build_graph(loaded)
    report.passed("graph re-extracted and self-checked",
                  f"max |graph - model| = {check['max_abs_diff']:.2g} on {check['samples']} probe inputs")
    _check_domain(cert, graph, report)
    full_graph = graph
    if cert.get("output") is not None:
        graph = select_output(graph, int(cert["output"]))

    verified: dict[str, float] = {}
    for name, entry in cert["methods"].items():
        value, detail = _verify_entry(graph, name, entry)
        claimed = cert.get("bounds", {}).get(name, value)
        if claimed != value:
            raise CertificateInvalid(f"method {name}: bounds[{name}] = {claimed!r} differs from its entry {value!r}")
        verified[name] = value
        report.passed(f"method {name}: bound {value:.6g}", detail)
    if set(cert.get("bounds", {})) - set(verified):
        raise CertificateInvalid(f"bounds lists methods without a witness: {sorted(set(cert['bounds']) - set(verified))}")

    headline = _number(cert["certified_bound"], "certified_bound")
    best = min(verified, key=verified.get)
    if cert["method"] not in verified or headline != verified[cert["method"]] or headline != verified[best]:
        raise CertificateInvalid(f"certified_bound {headline!r} (method {cert['method']!r}) is not the smallest "
                                 f"verified value ({verified[best]!r}, method {best!r})")
    what = f"of output {cert['output']} only" if cert.get("output") is not None else "of the whole output"
    report.passed("certified_bound", f"{headline:.6g} = the smallest verified bound ({cert['method']}), {what}")
    _check_lower(cert, headline, loaded, graph, report)
    data_ok = _check_data(cert, full_graph, loaded, data_path, ignore_data, report)
    _check_gates(cert, headline, data_ok, report)
    report.informational = [k for k in INFORMATIONAL if k.split("[")[0].split(".")[0] in cert]
    return report


def _check_domain(cert: dict, graph, report: CheckReport) -> None:
    """Every number is claimed on the box |x_i| <= max_abs_input, where no float32 intermediate can overflow:
    the box must be recorded and no larger than the one recomputed from the graph."""
    from lipverify.graph.check import input_domain

    if "max_abs_input" not in cert["model"]:
        raise CertificateInvalid("the certificate does not record the input domain (max_abs_input) its numbers hold "
                                 "on: it was made by an older lipverify; certify the model again")
    claimed = _number(cert["model"]["max_abs_input"], "model.max_abs_input")
    domain = input_domain(graph)
    if not claimed <= domain:
        raise CertificateInvalid(f"model.max_abs_input {claimed!r} is larger than the box on which no float32 "
                                 f"intermediate can overflow ({domain!r})")
    report.passed("input domain", f"every |x_i| <= {claimed:.6g}: no float32 intermediate overflows there")


def _check_lower(cert: dict, headline: float, loaded, graph, report: CheckReport) -> None:
    lower = cert.get("lower_bound")
    if lower is None:
        return
    lower = _number(lower, "lower_bound")
    if lower < 0 or lower > headline:
        raise CertificateInvalid(f"the certificate's lower bound {lower!r} is negative or exceeds its certified "
                                 f"bound {headline!r}")
    ratio = cert.get("ratio")
    if ratio is not None and headline > 0 and abs(_number(ratio, "ratio") - lower / headline) > 1e-12:
        raise CertificateInvalid(f"ratio {ratio!r} is not lower_bound / certified_bound")
    if lower == 0:
        return
    # the lower bound claims a difference quotient of the file (minus a rounding allowance) at a stored
    # pair: recompute the quotient on the file itself (an inflated lower bound would fake tightness)
    search = cert.get("lower_bound_search")
    pair = search.get("pair") if isinstance(search, dict) else None
    if not isinstance(pair, dict):
        raise CertificateInvalid("lower_bound > 0 but the pair of inputs it was measured at is missing")
    shape = tuple(cert["model"].get("input_shape") or ())
    x, y = (_decode_input(pair.get(k), shape, f"lower_bound_search.pair.{k}") for k in ("x", "y"))
    batch = search.get("batch_size", 1)
    if batch not in (1, 2):
        raise CertificateInvalid(f"lower_bound_search.batch_size {batch!r} must be 1 or 2")
    both = np.stack([x, y])
    out = (np.concatenate([np.asarray(loaded.reference(both[i:i + 1])) for i in range(2)]) if batch == 1
           else np.asarray(loaded.reference(both)))
    out = out.astype(np.float64).reshape(2, -1)
    if cert.get("output") is not None:
        out = out[:, int(cert["output"]):int(cert["output"]) + 1]
    dist = float(np.linalg.norm(x.astype(np.float64) - y.astype(np.float64)))
    # minus the float32 rounding allowance of both outputs (the rule the lower bound itself uses): a pair
    # so close that rounding dominates its raw quotient proves nothing about the exact function
    from lipverify.graph.rounding import OutputTolerance

    allowance = OutputTolerance(graph)(both, out)
    quotient = max(float(np.linalg.norm(out[0] - out[1])) - float(allowance.sum()), 0.0) / dist if dist > 0 else 0.0
    if not lower <= quotient * (1 + 1e-6):
        raise CertificateInvalid(f"lower_bound {lower!r} exceeds the file's rounding-corrected difference quotient "
                                 f"{quotient!r} at the stored pair")
    report.passed("lower bound", f"{lower:.6g} <= the file's rounding-corrected difference quotient {quotient:.6g} "
                  "at the stored pair")


def _decode_input(entry, shape: tuple, what: str) -> np.ndarray:
    import base64
    import binascii

    if not isinstance(entry, dict) or not isinstance(entry.get("base64"), str) or entry.get("shape") != list(shape):
        raise CertificateInvalid(f"{what} is malformed or not of the input shape {list(shape)}")
    try:
        raw = base64.b64decode(entry["base64"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CertificateInvalid(f"{what}: invalid base64") from exc
    if len(raw) != 4 * int(np.prod(shape)):
        raise CertificateInvalid(f"{what}: {len(raw)} bytes for the input shape {list(shape)}")
    a = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
    if not np.isfinite(a).all():
        raise CertificateInvalid(f"{what}: not finite")
    return a


def _check_gates(cert: dict, headline: float, data_ok: bool, report: CheckReport) -> None:
    for gate in cert.get("gates", []):
        if not isinstance(gate, dict) or not isinstance(gate.get("name"), str):
            raise CertificateInvalid("a gate entry is malformed")
        name = gate["name"]
        threshold, value = _number(gate.get("threshold"), f"gate {name}: threshold"), _number(
            gate.get("value"), f"gate {name}: value")
        if name == "max-L":
            if value != headline or bool(gate.get("passed")) != (value <= threshold):
                raise CertificateInvalid(f"gate {name}: its value or verdict does not follow from the certified bound")
        elif name.startswith("min-certified-acc@"):
            acc = (cert.get("data") or {}).get("certified_accuracy", {}).get(name.split("@", 1)[1])
            if acc is None or value != acc or bool(gate.get("passed")) != (value >= threshold):
                raise CertificateInvalid(f"gate {name}: its value or verdict does not follow from the data results")
            if not data_ok:
                continue
        else:
            raise CertificateInvalid(f"unknown gate {name!r}")
        report.passed(f"gate {name}", f"{'passed' if gate.get('passed') else 'failed'} (recomputed)")


def _data_spec(claimed: dict, data_path):
    """How the certificate says the data were read, validated field by field."""
    from lipverify.data import DataSpec

    options = claimed.get("spec")
    if not isinstance(options, dict):
        raise CertificateInvalid("data: the entry saying how the data were read (spec) is missing or malformed")
    kinds = {"x_key": str, "y_key": str, "label_column": str, "transform": (str, type(None)),
             "limit": (int, type(None)), "seed": int, "batch_size": int}
    if set(options) - set(kinds):
        raise CertificateInvalid(f"data: unknown spec entries {sorted(set(options) - set(kinds))}")
    for key, kind in kinds.items():
        v = options.get(key)
        if key in options and (isinstance(v, bool) or not isinstance(v, kind)):
            raise CertificateInvalid(f"data: spec.{key} = {v!r} is malformed")
    if (options.get("limit") is not None and options["limit"] < 1) or options.get("seed", 0) < 0 or \
            options.get("batch_size", 1) < 1:
        raise CertificateInvalid("data: spec.limit, seed or batch_size out of range")
    return DataSpec(path=str(data_path), **options)


# Parts of a certificate that describe the run but are not numbers about the model: `check` lists them as
# not verified instead of calling them valid.
INFORMATIONAL = ("timings", "versions", "self_check", "notes", "verification", "device", "method_reason",
                 "methods[*].seconds", "methods[*].check", "methods[*].info", "methods[*].layers", "layers (per-layer table)",
                 "data.pgd_check", "data.seconds", "data.pairwise_methods",
                 "lower_bound_search (all but the pair, which is re-measured)")


def _check_data(cert: dict, graph, loaded, data_path, ignore_data: bool, report: CheckReport) -> bool:
    """Recompute the results on data; True when they were verified."""
    claimed = cert.get("data")
    if claimed is None:
        return True
    if data_path is None:
        if ignore_data:
            report.unverified.append("results on data (certified accuracy, radii, their gates)")
            return False
        raise CertificateInvalid("the certificate claims results on data (certified accuracy, radii) that were not "
                                 "verified: pass --data FILE (the same data) to recompute them, or --ignore-data")
    from lipverify.data import data_sha256, iter_batches, sample_indices
    from lipverify.graph.transform import output_dim, pairwise_difference
    from lipverify.radii import compute_radii, logit_tolerances, model_logits, summarize

    if data_sha256(data_path) != claimed.get("sha256"):
        raise CertificateInvalid(f"the data file {data_path} is not the one the certificate was made with (sha256)")
    spec = _data_spec(claimed, data_path)
    eps = claimed.get("eps")
    if not isinstance(eps, list) or not eps:
        raise CertificateInvalid("data: the radii (eps) are missing or malformed")
    eps = [_number(e, "eps") for e in eps]
    report.passed("data file", f"sha256 matches; read with x_key={spec.x_key!r}, y_key={spec.y_key!r}, "
                  f"label_column={spec.label_column!r}, transform={spec.transform!r}, limit={spec.limit}, "
                  f"seed={spec.seed} (as the certificate says: check these are the data you mean)")
    L_global = _number(claimed.get("L_global"), "data: L_global")
    if L_global != cert["certified_bound"]:
        raise CertificateInvalid("data: the global bound used for the radii is not the certified bound")
    c = output_dim(graph)
    L_pair = None
    if claimed.get("L_pairwise") is not None:
        certs = claimed.get("pairwise_certificates")
        if not isinstance(certs, dict):
            raise CertificateInvalid("data: pairwise bounds are claimed without their certificates")
        rows = claimed["L_pairwise"]
        if not isinstance(rows, list) or len(rows) != c or not all(isinstance(r, list) and len(r) == c for r in rows):
            raise CertificateInvalid(f"data: L_pairwise must be a {c} x {c} matrix")
        L_pair = np.full((c, c), np.inf)
        np.fill_diagonal(L_pair, 0.0)
        for i in range(c):
            for j in range(i + 1, c):
                entry = certs.get(f"{i},{j}")
                if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
                    raise CertificateInvalid(f"data: no certificate for the class pair ({i}, {j})")
                value, _ = _verify_entry(pairwise_difference(graph, i, j), entry["method"], entry)
                if rows[i][j] != value or rows[j][i] != value:
                    raise CertificateInvalid(f"data: L_pairwise[{i}][{j}] differs from its verified certificate")
                L_pair[i, j] = L_pair[j, i] = value
        report.passed("pairwise bounds", f"{c * (c - 1) // 2} class-pair certificates re-checked")
    xs, ys, logits = [], [], []
    for x, y in iter_batches(spec, tuple(graph.input_shape)):
        logits.append(model_logits(loaded.reference, x.numpy()))
        ys.append(y.numpy())
        xs.append(x.numpy())
    if not ys:
        raise CertificateInvalid("data: the data file holds no samples")
    f, labels = np.concatenate(logits), np.concatenate(ys)
    tol, reach = logit_tolerances(graph, xs, f, labels, L_global, L_pair)
    result = compute_radii(f, labels, L_global, L_pair, eps, index=sample_indices(spec), logit_tol=tol,
                           max_radius=reach)
    mine = summarize(result, eps)
    if claimed.get("logit_tolerance") != float(tol.max()):
        raise CertificateInvalid(f"data: logit tolerance {claimed.get('logit_tolerance')!r}, recomputed "
                                 f"{float(tol.max())!r}")
    if claimed.get("curve") != mine["curve"]:
        raise CertificateInvalid("data: the certified-accuracy curve differs from the recomputed one")
    if claimed.get("form") != mine["form"]:
        raise CertificateInvalid(f"data: radius form {claimed.get('form')!r}, recomputed {mine['form']!r}")
    for key in ("n", "n_ties", "n_misclassified"):
        if claimed.get(key) != mine[key]:
            raise CertificateInvalid(f"data: {key} = {claimed.get(key)!r}, recomputed {mine[key]!r}")
    if _number(claimed.get("clean_accuracy"), "data: clean_accuracy") != mine["clean_accuracy"]:
        raise CertificateInvalid(f"data: clean accuracy {claimed.get('clean_accuracy')!r}, recomputed "
                                 f"{mine['clean_accuracy']!r}")
    claimed_acc = claimed.get("certified_accuracy") or {}
    if set(claimed_acc) != set(mine["certified_accuracy"]):
        raise CertificateInvalid("data: certified accuracies are claimed at other radii than the data entry's eps")
    for key, value in claimed_acc.items():
        if _number(value, f"data: certified accuracy at {key}") > mine["certified_accuracy"][key]:
            raise CertificateInvalid(f"data: certified accuracy at eps {key} is claimed as {value!r}, verified "
                                     f"{mine['certified_accuracy'][key]!r}")
    if claimed.get("radius_quantiles") != mine["radius_quantiles"]:
        raise CertificateInvalid(f"data: radius quantiles {claimed.get('radius_quantiles')!r}, recomputed "
                                 f"{mine['radius_quantiles']!r}")
    report.passed("results on data", f"{mine['n']} samples: clean accuracy and certified accuracy at "
                  f"{', '.join(claimed_acc)} recomputed from the model file ({mine['form']} radii)")
    return True
