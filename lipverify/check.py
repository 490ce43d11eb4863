"""``lipverify check CERT MODEL``: re-verify a certificate against a model file without re-solving.

An auditor's command. It trusts nothing in the certificate except as a claim to be checked:
1. the model file's sha256 (and its external data files) must match the certificate;
2. the graph is re-extracted from the file and self-checked against the file's own runtime;
3. every method's witness (per-layer factors, LipSDP multipliers, scalings) is re-checked with float64
   linear algebra only (Cholesky factorizations, exact norms; no solver, no randomness) by
   ``lipverify.verifier``, and the claimed bound is recomputed from the witness;
4. the headline ``certified_bound`` must be one of the verified values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lipverify.bounds.base import BoundResult
from lipverify.errors import SoundnessError, UserInputError
from lipverify.load.model import sha256_file

SUPPORTED_SCHEMAS = {"1.1"}


class CertificateInvalid(Exception):
    """The certificate does not hold for this model file (exit 1)."""


@dataclass
class CheckReport:
    steps: list[tuple[str, str]] = field(default_factory=list)  # (step, outcome)

    def passed(self, step: str, detail: str = "ok") -> None:
        self.steps.append((step, detail))


def read_certificate(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such certificate file")
    try:
        cert = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserInputError(f"{path}: not a JSON certificate ({type(exc).__name__})")
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read it ({exc.strerror or exc})")
    if not isinstance(cert, dict):
        raise UserInputError(f"{path}: not a certificate (expected a JSON object)")
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
    return cert


def check_certificate(cert_path, model_path, input_shape=None, spec=None, activation="relu",
                      factory=None) -> CheckReport:
    """Raise CertificateInvalid when the certificate does not hold; UserInputError for bad input."""
    from lipverify.certify import build_graph
    from lipverify.graph.transform import select_output
    from lipverify.load import load_model
    from lipverify.verifier import verify

    cert = read_certificate(cert_path)
    report = CheckReport()
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserInputError(f"{model_path}: no such model file")

    digest = sha256_file(model_path)
    if digest != cert["model"].get("sha256"):
        raise CertificateInvalid(f"file hash mismatch: the certificate is for sha256 {cert['model'].get('sha256')}, "
                                 f"{model_path} has {digest}")
    for name, expected in (cert["model"].get("data_files") or {}).items():
        data = model_path.parent / name
        if not data.is_file() or sha256_file(data) != expected:
            raise CertificateInvalid(f"external data file {name} does not match the certificate")
    report.passed("model file sha256", digest[:16] + "…")

    shape = input_shape or tuple(cert["model"].get("input_shape") or ()) or None
    loaded = load_model(model_path, shape, spec, activation, factory)
    graph, self_check = build_graph(loaded)
    report.passed("graph re-extracted and self-checked",
                  f"max |graph - model| = {self_check['max_abs_diff']:.2g} on {self_check['samples']} inputs")
    if cert.get("output") is not None:
        graph = select_output(graph, int(cert["output"]))

    verified: dict[str, float] = {}
    for name, entry in cert["methods"].items():
        try:
            value = float(entry["value"])
            witness = entry["witness"]
            if not isinstance(witness, dict):
                raise TypeError("witness is not an object")
        except (KeyError, TypeError, ValueError):
            raise CertificateInvalid(f"method {name}: no value/witness in the certificate")
        claimed = cert.get("bounds", {}).get(name, value)
        if claimed != value:
            raise CertificateInvalid(f"method {name}: bounds[{name}] = {claimed} differs from its entry {value}")
        result = BoundResult(method=name, value=value, layers=[], check="", witness=witness)
        try:
            detail = verify(graph, result)
        except SoundnessError as exc:
            raise CertificateInvalid(f"method {name}: {exc}")
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
            raise CertificateInvalid(f"method {name}: malformed witness ({type(exc).__name__}: {exc})")
        verified[name] = value
        report.passed(f"method {name}: bound {value:.6g}", detail)

    headline = float(cert["certified_bound"])
    if not headline >= min(verified.values()):
        raise CertificateInvalid(f"certified_bound {headline} is below every verified method value")
    report.passed("certified_bound", f"{headline:.6g} is backed by a verified witness")
    lower = cert.get("lower_bound")
    if isinstance(lower, (int, float)) and lower > headline:
        raise CertificateInvalid(f"the certificate's own lower bound {lower} exceeds its certified bound {headline}")
    return report
