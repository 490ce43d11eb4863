"""A Markdown summary of a certificate, for pull-request comments and CI job summaries.

Reads only the certificate dict (like the HTML report, and with the same safe-direction number
formatting). GitHub-flavoured: pipe tables, and <details> for the long per-layer table.
"""

from __future__ import annotations

from html import escape

from lipverify.report.html import (
    atomic_write_text,
    bound_rows,
    fmt_num,
    fmt_pct,
    fmt_seconds,
    fmt_shape,
    gate_verdict,
    model_name,
    soundness_alarm,
    ratio_of,
)
from lipverify.report.labels import label, pairwise_text, radius_form, run_rows
from lipverify.report.numbers import gate_check


def _cell(v) -> str:
    """Table-safe text: no pipes or newlines to break the row, no raw HTML."""
    text = escape(str(v), quote=False).replace("|", "\\|")
    return " ".join(text.split())


def _code(v) -> str:
    text = str(v).replace("`", "'")
    return "`" + _cell(text) + "`" if text else "—"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _verdict_text(v: str | None) -> str:
    return {"pass": "✅ all passed", "fail": "❌ failed", None: "none"}[v]


def render_markdown(cert: dict) -> str:
    if not isinstance(cert, dict):
        raise TypeError("the certificate must be a dict")
    out: list[str] = []
    model = cert.get("model") or {}
    output = cert.get("output")
    scope = "" if output is None else f" (logit {_cell(output)} only)"
    out.append(f"## Lipschitz certificate: {_code(model_name(cert))}")
    out.append("")
    ratio = cert.get("ratio")
    if ratio is None:
        ratio = ratio_of(cert.get("lower_bound"), cert.get("certified_bound"))
    out.append(
        f"**Certified L2 Lipschitz bound: {fmt_num(cert.get('certified_bound'), 'up')}**{scope} "
        f"(method {_code(cert.get('method', '—'))}) · lower bound {fmt_num(cert.get('lower_bound'), 'down')} "
        f"· tightness {fmt_num(ratio, 'down', 3)} · gates: {_verdict_text(gate_verdict(cert))}"
    )
    if soundness_alarm(cert):
        out += ["", "> **Warning:** the sampled lower bound exceeds the certified bound: this certificate "
                "is wrong (a soundness bug); do not rely on it."]
    out.append("")
    out.append(_table(
        ["model", "value"],
        [
            ["file", _code(model.get("path", ""))],
            ["sha256", _code(model.get("sha256", ""))],
            ["format", _cell(model.get("format", "—"))],
            ["input shape", _cell(fmt_shape(model.get("input_shape")))],
        ] + ([["output shape", _cell(fmt_shape(model.get("output_shape")))]] if "output_shape" in model else []),
    ))

    gates = [g for g in cert.get("gates") or [] if isinstance(g, dict)]
    if gates:
        out += ["", "### Gates", ""]
        out.append(_table(
            ["gate", "value vs threshold", "result"],
            [[_code(g.get("name", "")), _cell(gate_check(g, with_name=False)),
              "✅ pass" if g.get("passed") else "❌ fail"] for g in gates],
        ))

    rows = []
    verification = cert.get("verification") or {}
    for name, value, chosen in bound_rows(cert):
        check = verification.get(name) if isinstance(verification, dict) else None
        rows.append([
            _code(name) + (" **(reported)**" if chosen else ""),
            fmt_num(value, "up"),
            fmt_num(ratio_of(cert.get("lower_bound"), value), "down", 3),
            _cell(check) if check else "—",
        ])
    out += ["", "### Global bounds", ""]
    out.append(_table(["method", "certified upper bound", "lower / certified", "verification"], rows))
    out.append("")
    out.append(f"Sampled lower bound: {fmt_num(cert.get('lower_bound'), 'down')}")

    data = cert.get("data")
    if isinstance(data, dict):
        out += ["", "### Certified radii", ""]
        out.append(
            f"{_cell(data.get('n', '—'))} samples from {_code(data.get('path', ''))}: clean accuracy "
            f"{fmt_pct(data.get('clean_accuracy'))}, {_cell(data.get('n_ties', '—'))} ties, "
            f"{_cell(data.get('n_misclassified', '—'))} misclassified; radius form: "
            f"{_cell(radius_form(data))}."
        )
        extra = []
        if data.get("sha256"):
            extra.append(f"data sha256 {_code(data['sha256'])}")
        if pairwise_text(data):
            extra.append(f"pairwise bounds by {_cell(pairwise_text(data))}")
        if extra:
            out += ["", "; ".join(extra) + "."]
        ca = data.get("certified_accuracy") or {}
        if ca:
            out.append("")
            out.append(_table(["ε (L2)", f"certified accuracy ({_cell(data.get('form', '?'))} radii)"],
                              [[_cell(k), fmt_pct(v)] for k, v in ca.items()]))
        q = data.get("radius_quantiles") or {}
        if q:
            out.append("")
            out.append(_table([_cell(k) for k in q], [[fmt_num(v, "down") for v in q.values()]]))

    layers = [la for la in cert.get("layers") or [] if isinstance(la, dict)]
    if layers:
        cumulative = any(la.get("cumulative") is not None for la in layers)
        out += ["", f"<details><summary>Per-layer factors ({len(layers)} layers)</summary>", ""]
        rows = []
        for i, la in enumerate(layers):
            merge = "factor" in la and la.get("factor") is None
            row = [str(i), _code(la.get("name", "")), _cell(la.get("op", "—")), _cell(fmt_shape(la.get("in_shape"))),
                   _cell(fmt_shape(la.get("out_shape"))), "merge" if merge else fmt_num(la.get("factor"), "up"),
                   fmt_num(la.get("lower"), "down")]
            if cumulative:
                row.append(fmt_num(la.get("cumulative"), "up"))
            rows.append(row + [_cell(la.get("how", "—"))])
        out.append(_table(["#", "layer", "op", "in", "out", "factor", "lower"]
                          + (["bound so far"] if cumulative else []) + ["how"], rows))
        out += ["", "</details>"]

    notes = ([f"method choice: {_cell(cert['method_reason'])}"] if cert.get("method_reason") else []) + \
        [_cell(n) for n in cert.get("notes") or []]
    run = cert.get("run") if isinstance(cert.get("run"), dict) else {}
    notes += [f"**cut by --budget-s:** {_cell(c)}" for c in run.get("cut_by_budget") or []]
    if notes:
        out += ["", "### Notes", ""] + [f"- {n}" for n in notes]
    audit = run_rows(cert)
    if audit:
        out += ["", "### Audit trail", ""]
        out.append(_table(["", "value"], [[_cell(k), _code(v) if k in ("Command", "Git commit") else _cell(v)]
                                          for k, v in audit]))

    timings = cert.get("timings")
    versions = cert.get("versions")
    foot = []
    if isinstance(timings, dict) and timings:
        foot.append("timings: " + ", ".join(f"{_cell(label(str(k)))} {fmt_seconds(v)}" for k, v in timings.items()))
    if cert.get("device") is not None:
        foot.append(f"device: {_cell(cert.get('device'))}")
    if isinstance(versions, dict) and versions:
        foot.append("versions: " + ", ".join(f"{_cell(k)} {_cell(v)}" for k, v in versions.items()))
    if foot:
        out += ["", "<sub>" + " · ".join(foot) + "</sub>"]
    return "\n".join(out) + "\n"


def write_markdown(cert: dict, path) -> None:
    """Write the Markdown report to ``path`` (atomically)."""
    atomic_write_text(path, render_markdown(cert))
