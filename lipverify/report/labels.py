"""Words for the certificate's keys, shared by the HTML and Markdown reports (no raw JSON keys
such as ``output_shape`` or ``load_s`` in front of a reader)."""

from __future__ import annotations

KEY_LABELS = {
    # model
    "path": "File", "sha256": "SHA-256", "format": "Format", "input_shape": "Input shape",
    "output_shape": "Output shape", "data_files": "External data files (sha256)",
    "max_abs_input": "Input domain (every |x_i| ≤; no float32 overflow inside)",
    # timings
    "load_s": "load model", "extract_s": "extract graph + self-check", "bound_s": "bound methods (all)",
    "lower_s": "sampled lower bound", "data_s": "radii on the data", "total_s": "total",
}

RUN_LABELS = [
    ("timestamp_utc", "Time (UTC)"), ("command", "Command"), ("lipverify_version", "lipverify version"),
    ("git", "Git commit"), ("host", "Host"), ("platform", "Platform"), ("device", "Device"),
    ("device_name", "Device name"), ("budget_s", "Time budget (--budget-s)"),
]

RADIUS_FORMS = {
    "pairwise": "pairwise radii (per-class-pair bounds L_yj; the global form where larger)",
    "global": "global radii (margin / (√2 L))",
}


def label(key: str) -> str:
    """A reader's label for a certificate key: known keys by name, others made readable."""
    if key in KEY_LABELS:
        return KEY_LABELS[key]
    if key.startswith("bound_") and key.endswith("_s"):  # per-method timings: bound_<method>_s
        return f"bound: {key[len('bound_'):-2]}"
    text = key[:-2] + " (s)" if key.endswith("_s") else key
    return text.replace("_", " ")


def radius_form(data: dict) -> str:
    form = data.get("form")
    return RADIUS_FORMS.get(form, f"{form} radii")


def pairwise_text(data: dict) -> str | None:
    """Which methods bounded how many class pairs, e.g. ``lipsdp-neuron 40, product 5``."""
    used = data.get("pairwise_methods")
    if not isinstance(used, dict) or not used:
        return None
    parts = [f"{k} {v}" for k, v in used.items() if isinstance(v, int)]
    dropped = used.get("dropped_for_time")
    if dropped:
        parts.append(f"dropped for time: {', '.join(map(str, dropped))}")
    return ", ".join(parts) + " class pairs" if parts else None


def run_rows(cert: dict) -> list[tuple[str, str]]:
    """The audit trail as (label, text) rows; options and cuts as one row each."""
    run = cert.get("run")
    if not isinstance(run, dict):
        return []
    rows = []
    for key, name in RUN_LABELS:
        value = run.get(key)
        if key == "git":
            value = None if not isinstance(value, dict) else \
                f"{value.get('commit')}{' (with uncommitted changes)' if value.get('dirty') else ''}"
        if key == "budget_s" and value is None:
            value = "none (nothing was cut by time)"
        if value is not None:
            rows.append((name, str(value)))
    options = run.get("options")
    if isinstance(options, dict):
        rows.append(("Options", " ".join(_as_flags(options))))
    cuts = run.get("cut_by_budget")
    if isinstance(cuts, list) and run.get("budget_s") is not None:
        rows.append(("Cut by --budget-s", "; ".join(map(str, cuts)) if cuts else "nothing"))
    return rows


def _as_flags(options: dict) -> list[str]:
    """The recorded options spelled as the CLI flags that set them (``--lower-starts 16``)."""
    flat = {}
    for k, v in options.items():  # one level of nesting: the data options
        for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)]):
            flat[kk or k] = vv
    out = []
    for k, v in flat.items():
        if v in (None, [], False) or k == "pairwise":
            continue
        flag = {"path": "--data", "max_L": "--max-L"}.get(k, "--" + k.replace("_", "-"))
        if k == "min_certified_acc" and isinstance(v, list):
            out += [f"{flag} {g.get('accuracy')}@{g.get('eps')}" for g in v if isinstance(g, dict)]
        elif v is True:
            out.append(flag)
        else:
            out.append(f"{flag} {','.join(map(str, v)) if isinstance(v, list) else v}")
    return out
