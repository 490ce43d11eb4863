"""A one-file HTML audit report built from the certificate dict alone.

The page reads only the certificate (the JSON the tool writes), so a new bound method or a new
key appears without changes here: methods come from ``bounds``, and the full certificate is
embedded at the end. Everything is inline (CSS, SVG plots); nothing is fetched, so the file can
be archived with a release or attached to a review and still open offline.

Numbers are shown to 6 significant digits, rounded in the safe direction: certified upper bounds
up, lower bounds, radii and certified accuracies down, so the page never claims more than the
certificate does. Every string from the certificate is escaped.
"""

from __future__ import annotations

import json
import math
import os
from html import escape

from lipverify.report import plots
from lipverify.report.labels import label, pairwise_text, radius_form, run_rows
from lipverify.report.numbers import SIG, fmt_num, fmt_pct, gate_check  # noqa: F401 (markdown.py imports them here)


# --------------------------------------------------------------------------- shared formatting
# (markdown.py imports these so both reports print identical numbers)


def fmt_shape(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, (list, tuple)):
        return "×".join(str(d) for d in v) if v else "scalar"
    return str(v)


def fmt_seconds(v) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if f < 1:
        return f"{f * 1000:.3g} ms"
    return f"{f:.3g} s"


def gate_verdict(cert: dict) -> str | None:
    """"pass", "fail", or None without gates."""
    gates = [g for g in cert.get("gates") or [] if isinstance(g, dict)]
    if not gates:
        return None
    return "pass" if all(bool(g.get("passed")) for g in gates) else "fail"


def soundness_alarm(cert: dict) -> bool:
    """True when the certificate contradicts itself (lower bound above the certified bound)."""
    try:
        return float(cert.get("lower_bound")) > float(cert.get("certified_bound"))
    except (TypeError, ValueError):
        return False


def model_name(cert: dict) -> str:
    path = (cert.get("model") or {}).get("path") or "model"
    return os.path.basename(str(path)) or str(path)


def bound_rows(cert: dict) -> list[tuple[str, object, bool]]:
    """(method, certified value, chosen?) sorted tightest first."""
    chosen = cert.get("method")
    rows = [(str(k), v, k == chosen) for k, v in (cert.get("bounds") or {}).items()]

    def key(r):
        try:
            return float(r[1])
        except (TypeError, ValueError):
            return math.inf

    return sorted(rows, key=key)


def ratio_of(lower, upper) -> float | None:
    try:
        lo, up = float(lower), float(upper)
    except (TypeError, ValueError):
        return None
    if up > 0 and math.isfinite(lo) and math.isfinite(up):
        return lo / up
    return None


def atomic_write_text(path, text: str) -> None:
    """Write via a temp file in the same folder and os.replace (no half-written reports)."""
    from lipverify.fileio import atomic_write_text as write

    write(path, text)


# --------------------------------------------------------------------------- HTML

CSS = """
:root { --fg:#1d2430; --muted:#5b6573; --line:#d9dee5; --bg:#ffffff; --soft:#f4f6f9;
        --ok:#2e7d32; --bad:#c62828; --accent:#3b6ea5; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); background: var(--bg); margin: 0; line-height: 1.45; }
main { max-width: 1040px; margin: 0 auto; padding: 28px 28px 60px; }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.2em; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
.sub { color: var(--muted); margin: 0 0 18px; word-break: break-all; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0 8px; }
.card { flex: 1 1 180px; background: var(--soft); border: 1px solid var(--line); border-radius: 8px;
        padding: 12px 14px; }
.card .k { color: var(--muted); font-size: .85em; font-weight: 600; }
.card .v { font-size: 1.45em; font-weight: 600; margin-top: 2px; }
.card .n { color: var(--muted); font-size: .85em; }
table { border-collapse: collapse; width: 100%; margin: 8px 0 14px; font-size: .92em; }
th, td { border: 1px solid var(--line); padding: 5px 9px; text-align: left; vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv th { width: 210px; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .9em;
              word-break: break-all; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 10px; font-weight: 600; font-size: .85em;
         color: #fff; }
.pass { background: var(--ok); } .fail { background: var(--bad); } .none { background: #8a94a3; }
tr.chosen td { background: #eef7ee; }
.plot { margin: 8px 0 16px; text-align: center; }
.plot svg { max-width: 100%; height: auto; }
.note { color: var(--muted); font-size: .88em; }
details { margin: 10px 0; } summary { cursor: pointer; color: var(--accent); }
pre { background: var(--soft); border: 1px solid var(--line); padding: 10px; overflow-x: auto;
      font-size: .8em; max-height: 520px; }
.alarm { background: #fdecea; border: 1px solid var(--bad); color: var(--bad); padding: 10px 14px;
         border-radius: 6px; font-weight: 600; }
footer { color: var(--muted); font-size: .82em; margin-top: 40px; }
"""


def _e(v) -> str:
    return escape(str(v), quote=True)


def _kv_table(rows: list[tuple[str, str]]) -> str:
    """Rows of (header, already-escaped HTML)."""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _card(key: str, value: str, note: str = "") -> str:
    n = f'<div class="n">{note}</div>' if note else ""
    return f'<div class="card"><div class="k">{_e(key)}</div><div class="v">{value}</div>{n}</div>'


def _badge(verdict: str | None) -> str:
    if verdict is None:
        return '<span class="badge none">no gates</span>'
    return f'<span class="badge {verdict}">{verdict.upper()}</span>'


def _plot(svg: str | None) -> str:
    return f'<div class="plot">{svg}</div>' if svg else ""


def _section_summary(cert: dict) -> str:
    method = cert.get("method")
    output = cert.get("output")
    scope = "whole logit map" if output is None else f"output {_e(output)} only"
    ratio = cert.get("ratio")
    if ratio is None:
        ratio = ratio_of(cert.get("lower_bound"), cert.get("certified_bound"))
    cards = [
        _card("Certified L2 Lipschitz bound", _e(fmt_num(cert.get("certified_bound"), "up")),
              f"method <code>{_e(method or '—')}</code>, {scope}"),
        _card("Lower bound (attack)", _e(fmt_num(cert.get("lower_bound"), "down")),
              "the true constant is at least this"),
        _card("Tightness", _e(fmt_num(ratio, "down", 3)), "lower / certified (1 = exact)"),
        _card("Gates", _badge(gate_verdict(cert)), ""),
    ]
    data = cert.get("data")
    if isinstance(data, dict):
        ca = data.get("certified_accuracy") or {}
        if ca:
            eps, acc = next(iter(ca.items()))
            cards.append(_card(f"Certified accuracy @ ε={eps}", _e(fmt_pct(acc)),
                               f"{_e(data.get('form', '?'))} radii; clean {_e(fmt_pct(data.get('clean_accuracy')))}"))
    warn = ""
    if soundness_alarm(cert):
        warn = (
            '<p class="alarm">The sampled lower bound exceeds the certified bound: the certificate '
            "is wrong (a soundness bug). Do not rely on it; please report it.</p>"
        )
    return warn + f'<div class="cards">{"".join(cards)}</div>'


def _section_model(cert: dict) -> str:
    m = cert.get("model") or {}
    rows = [
        ("File", f"<code>{_e(m.get('path', '—'))}</code>"),
        ("SHA-256", f"<code>{_e(m.get('sha256', '—'))}</code>"),
        ("Format", _e(m.get("format", "—"))),
        ("Input shape", _e(fmt_shape(m.get("input_shape")))),
    ]
    for k, v in m.items():  # any further model fields
        if k in ("path", "sha256", "format", "input_shape"):
            continue
        if k == "output_shape":
            rows.append((label(k), _e(fmt_shape(v))))
        elif isinstance(v, dict):
            if v:
                rows.append((label(k), "<br>".join(f"<code>{_e(f)}</code>: <code>{_e(h)}</code>" for f, h in v.items())))
        else:
            rows.append((label(str(k)), _e(v)))
    output = cert.get("output")
    rows.append(("Bounded map", "all logits" if output is None else f"logit {_e(output)} only"))
    if cert.get("device") is not None:
        rows.append(("Device", _e(cert.get("device"))))
    return "<h2>Model</h2>" + _kv_table(rows)


def _section_bounds(cert: dict) -> str:
    lower = cert.get("lower_bound")
    verification = cert.get("verification") or {}
    rows = []
    for name, value, chosen in bound_rows(cert):
        ratio = ratio_of(lower, value)
        check = verification.get(name) if isinstance(verification, dict) else None
        mark = ' <span class="badge pass">reported</span>' if chosen else ""
        rows.append(
            f'<tr class="{"chosen" if chosen else ""}"><td><code>{_e(name)}</code>{mark}</td>'
            f'<td class="num">{_e(fmt_num(value, "up"))}</td>'
            f'<td class="num">{_e(fmt_num(ratio, "down", 3))}</td>'
            f"<td>{_e(check) if check else '—'}</td></tr>"
        )
    table = (
        "<table><tr><th>method</th><th>certified upper bound</th><th>lower / certified</th>"
        "<th>verification</th></tr>" + "".join(rows) + "</table>"
    )
    note = (
        f'<p class="note">Sampled lower bound: <b>{_e(fmt_num(lower, "down"))}</b>. Each certified '
        "bound is a float64 upper bound with an explicit rounding margin; the reported one is the "
        "smallest that passed its independent check.</p>"
    )
    chart = _plot(plots.bounds_chart_svg(cert.get("bounds"), lower, cert.get("method")))
    return "<h2>Global bounds</h2>" + table + note + chart


def _section_layers(cert: dict) -> str:
    layers = [la for la in cert.get("layers") or [] if isinstance(la, dict)]
    if not layers:
        return ""
    rows = []
    cumulative = any(la.get("cumulative") is not None for la in layers)
    for i, la in enumerate(layers):
        merge = "factor" in la and la.get("factor") is None
        so_far = f"<td class='num'>{_e(fmt_num(la.get('cumulative'), 'up'))}</td>" if cumulative else ""
        rows.append(
            f"<tr><td class='num'>{i}</td><td><code>{_e(la.get('name', '—'))}</code></td>"
            f"<td>{_e(la.get('op', '—'))}</td><td class='mono'>{_e(fmt_shape(la.get('in_shape')))}</td>"
            f"<td class='mono'>{_e(fmt_shape(la.get('out_shape')))}</td>"
            f"<td class='num'>{'merge' if merge else _e(fmt_num(la.get('factor'), 'up'))}</td>"
            f"<td class='num'>{_e(fmt_num(la.get('lower'), 'down'))}</td>"
            f"<td class='num'>{_e(fmt_num(la.get('tau'), 'up'))}</td>{so_far}"
            f"<td>{_e(la.get('how', '—'))}</td></tr>"
        )
    table = (
        "<table><tr><th>#</th><th>layer</th><th>op</th><th>in shape</th><th>out shape</th>"
        "<th>factor (upper)</th><th>lower</th><th>τ</th>" + ("<th>bound so far</th>" if cumulative else "")
        + "<th>how</th></tr>" + "".join(rows) + "</table>"
    )
    chart = _plot(plots.factor_chart_svg(layers))
    summary = f"Per-layer table ({len(layers)} layers)"
    return (
        "<h2>Per-layer factors</h2>"
        '<p class="note">Bars: the certified factor of each layer (its product over the network is '
        "the product bound); ticks: a lower estimate of the same factor. A wide gap marks a "
        "layer whose bound is loose.</p>"
        + chart
        + f"<details{' open' if len(layers) <= 30 else ''}><summary>{summary}</summary>{table}</details>"
    )


def _section_data(cert: dict) -> str:
    data = cert.get("data")
    if not isinstance(data, dict):
        return ""
    rows = [
        ("Data", f"<code>{_e(data.get('path', '—'))}</code>"),
        ("Samples", _e(data.get("n", "—"))),
        ("Clean accuracy", _e(fmt_pct(data.get("clean_accuracy")))),
        ("Ties / misclassified", f"{_e(data.get('n_ties', '—'))} / {_e(data.get('n_misclassified', '—'))}"),
        ("Radius form", _e(radius_form(data))),
    ]
    if data.get("sha256"):
        rows.insert(1, ("Data SHA-256", f"<code>{_e(data['sha256'])}</code>"))
    pairs = pairwise_text(data)
    if pairs:
        rows.append(("Pairwise bounds by", _e(pairs)))
    eps_rows = "".join(
        f"<tr><td class='num'>{_e(k)}</td><td class='num'>{_e(fmt_pct(v))}</td></tr>"
        for k, v in (data.get("certified_accuracy") or {}).items()
    )
    eps_table = (
        f"<table style='width:auto'><tr><th>ε (L2)</th><th>certified accuracy ({_e(data.get('form', '?'))} radii)</th></tr>"
        + eps_rows + "</table>"
        if eps_rows else ""
    )
    q = data.get("radius_quantiles") or {}
    q_table = ""
    if q:
        heads = "".join(f"<th>{_e(k)}</th>" for k in q)
        vals = "".join(f"<td class='num'>{_e(fmt_num(v, 'down'))}</td>" for v in q.values())
        q_table = f"<p class='note'>Certified radius quantiles over all samples (0 = not certified):</p><table style='width:auto'><tr>{heads}</tr><tr>{vals}</tr></table>"
    return (
        "<h2>Certified radii on the data</h2>"
        + _kv_table(rows)
        + _plot(plots.radius_curve_svg(data))
        + eps_table
        + q_table
        + '<p class="note">A sample is certified at ε when no L2 perturbation of norm ≤ ε can change '
        "its (correct) prediction; ties and misclassified samples are never certified.</p>"
    )


def _section_notes(cert: dict) -> str:
    """How the method was chosen, the notes of the run, and what --budget-s cut."""
    items = []
    if cert.get("method_reason"):
        items.append(f"<li>Method choice: {_e(cert['method_reason'])}</li>")
    items += [f"<li>{_e(n)}</li>" for n in cert.get("notes") or []]
    cuts = (cert.get("run") or {}).get("cut_by_budget") if isinstance(cert.get("run"), dict) else None
    items += [f"<li><b>Cut by --budget-s:</b> {_e(c)}</li>" for c in cuts or []]
    return f"<h2>Notes</h2><ul>{''.join(items)}</ul>" if items else ""


def _section_gates(cert: dict) -> str:
    gates = [g for g in cert.get("gates") or [] if isinstance(g, dict)]
    if not gates:
        return ""
    rows = "".join(
        f"<tr><td><code>{_e(g.get('name', '—'))}</code></td><td class='num'>{_e(gate_check(g, with_name=False))}</td>"
        f"<td>{_badge('pass' if g.get('passed') else 'fail')}</td></tr>"
        for g in gates
    )
    return (
        "<h2>Gates</h2><table><tr><th>gate</th><th>value vs threshold</th><th>result</th></tr>"
        + rows + "</table>"
    )


def _section_run(cert: dict) -> str:
    out = ""
    audit = run_rows(cert)
    if audit:
        out += "<h2>Audit trail</h2>" + _kv_table([(k, f"<code>{_e(v)}</code>" if k in ("Command", "Git commit")
                                                    else _e(v)) for k, v in audit])
    timings = cert.get("timings")
    if isinstance(timings, dict) and timings:
        out += "<h2>Timings</h2>" + _kv_table([(label(str(k)), _e(fmt_seconds(v))) for k, v in timings.items()])
    versions = cert.get("versions")
    if isinstance(versions, dict) and versions:
        out += "<h2>Versions</h2>" + _kv_table([(k, f"<code>{_e(v)}</code>") for k, v in versions.items()])
    return out


def render_html(cert: dict) -> str:
    """The report as a string (``write_html`` writes it)."""
    if not isinstance(cert, dict):
        raise TypeError("the certificate must be a dict")
    name = model_name(cert)
    raw = json.dumps(cert, indent=2, sort_keys=False, default=str, ensure_ascii=False)
    body = (
        f"<h1>Lipschitz certificate: {_e(name)}</h1>"
        f'<p class="sub">{_e((cert.get("model") or {}).get("path", ""))} · schema '
        f'{_e(cert.get("schema_version", "?"))}</p>'
        + _section_summary(cert)
        + _section_model(cert)
        + _section_bounds(cert)
        + _section_layers(cert)
        + _section_data(cert)
        + _section_gates(cert)
        + _section_notes(cert)
        + _section_run(cert)
        + "<h2>Full certificate</h2><details><summary>JSON</summary><pre>"
        + _e(raw)
        + "</pre></details>"
        + '<footer>Generated by lipverify from the certificate alone; self-contained, no network.</footer>'
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>lipverify: {_e(name)}</title><style>{CSS}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def write_html(cert: dict, path) -> None:
    """Write the self-contained HTML report to ``path`` (atomically)."""
    atomic_write_text(path, render_html(cert))
