"""Plots of a certificate as inline SVG strings (matplotlib, Agg backend, no files, no network).

Each function takes parts of the certificate dict and returns an ``<svg ...>`` string ready to
paste into HTML, or ``None`` when the certificate has nothing to draw. Text is drawn as paths
(matplotlib's default ``svg.fonttype``), so the SVG needs no font and renders the same anywhere.
"""

from __future__ import annotations

import io
import math
import re
from html import escape

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from lipverify.report.numbers import fmt_up  # noqa: E402

UPPER_COLOR = "#3b6ea5"
LOWER_COLOR = "#d2691e"
CHOSEN_COLOR = "#2e7d32"


def _num(v) -> float | None:
    """A finite float or None (certificate values may be missing, null or strings)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _floor(v: float, sig: int) -> str:
    """``v`` to ``sig`` significant digits rounded down (labels never overstate a lower bound)."""
    if v <= 0:
        return f"{v:.{sig}g}"
    scale = 10.0 ** (math.floor(math.log10(v)) - sig + 1)
    return f"{math.floor(v / scale * (1 + 1e-12)) * scale:.{sig}g}"


def _pct_floor(a: float) -> str:
    """A fraction as a percentage with one decimal, rounded down (accuracy labels)."""
    return f"{math.floor(a * 1000.0 + 1e-9) / 10.0:.1f}%"


def _to_svg(fig, label: str) -> str:
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "lipverify", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    svg = buf.getvalue()
    # Drop the XML prolog and DOCTYPE (the DTD address is a URL; neither belongs inside HTML).
    start = svg.find("<svg")
    svg = svg[start:]
    # matplotlib echoes every text as an XML comment beside its glyph paths; drop them (they
    # repeat certificate strings verbatim and add nothing to the picture)
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    # Fluid width in the page; the viewBox keeps the aspect ratio.
    svg = re.sub(r'(<svg[^>]*?)\swidth="[^"]*"\sheight="[^"]*"', r'\1 style="max-width:100%;height:auto"', svg, count=1)
    # text is drawn as paths: name the picture for screen readers and text search
    return svg.replace("<svg", f'<svg role="img" aria-label="{escape(label, quote=True)}"', 1)


def _short(name: str, limit: int = 36) -> str:
    name = str(name)
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def factor_chart_svg(layers) -> str | None:
    """Horizontal bars of each layer's certified factor (log scale) with its lower estimate.

    Horizontal, so that long layer names stay readable on deep networks. Layers without a
    positive factor (e.g. reshapes reported with no factor) are left out.
    """
    rows = []
    for i, layer in enumerate(layers or []):
        if not isinstance(layer, dict):
            continue
        up = _num(layer.get("factor"))
        if up is None:
            up = _num(layer.get("tau"))
        if up is None or up <= 0:
            continue
        low = _num(layer.get("lower"))
        label = f"{_short(layer.get('name', f'layer {i}'))} ({layer.get('op', '?')})"
        rows.append((label, up, low if low is not None and low > 0 else None))
    if not rows:
        return None
    n = len(rows)
    fig, ax = plt.subplots(figsize=(8.0, min(0.32 * n + 1.2, 40.0)))
    ys = list(range(n))[::-1]
    ax.barh(ys, [r[1] for r in rows], color=UPPER_COLOR, height=0.6, label="certified factor (upper)")
    low_pts = [(y, r[2]) for y, r in zip(ys, rows) if r[2] is not None]
    if low_pts:
        ax.scatter(
            [p[1] for p in low_pts], [p[0] for p in low_pts], marker="|", s=220, linewidths=2.5,
            color=LOWER_COLOR, zorder=3, label="lower estimate",
        )
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}")
    lo_v = min([r[1] for r in rows] + [r[2] for r in rows if r[2] is not None])
    hi_v = max(r[1] for r in rows)
    decades = math.log10(hi_v * 4.0) - math.log10(lo_v / 2.0)
    subs = (1.0, 2.0, 5.0) if decades <= 3 else (1.0,)
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10.0, subs=subs))
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks(ys)
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.axvline(1.0, color="#888", linewidth=0.8, linestyle="--")
    ax.set_xlabel("Lipschitz factor (log scale)")
    ax.set_title("Per-layer factors")
    ax.grid(axis="x", which="both", alpha=0.25)
    ax.legend(loc="lower right", fontsize=8)
    # bars start at the left edge: keep a decade of room below the smallest value
    vals = [r[1] for r in rows] + [p[1] for p in low_pts]
    ax.set_xlim(min(vals) / 2.0, max(vals) * 2.0)
    return _to_svg(fig, "Per-layer factors (log scale) with lower estimates")


def bounds_chart_svg(bounds, lower=None, chosen=None) -> str | None:
    """One bar per method's certified bound, with the sampled lower bound as a vertical line."""
    items = [(str(k), _num(v)) for k, v in (bounds or {}).items()]
    items = [(k, v) for k, v in items if v is not None and v > 0]
    if not items:
        return None
    items.sort(key=lambda kv: kv[1])
    n = len(items)
    fig, ax = plt.subplots(figsize=(8.0, 0.45 * n + 1.3))
    ys = list(range(n))
    colors = [CHOSEN_COLOR if k == chosen else UPPER_COLOR for k, _ in items]
    ax.barh(ys, [v for _, v in items], color=colors, height=0.6)
    for y, (_, v) in zip(ys, items):
        ax.text(v, y, f" {fmt_up(v, 4)}", va="center", fontsize=8)  # certified bounds: rounded up
    ax.set_yticks(ys)
    ax.set_yticklabels([_short(k) for k, _ in items], fontsize=9)
    low = _num(lower)
    if low is not None and low > 0:
        ax.axvline(low, color=LOWER_COLOR, linewidth=2)
    ax.set_xlim(0, max(v for _, v in items) * 1.18)
    xlabel = "global L2 Lipschitz bound"
    if low is not None and low > 0:
        xlabel += f"  (orange line: sampled lower bound {_floor(low, 4)})"
    ax.set_xlabel(xlabel)
    ax.set_title("Certified bounds by method (true constant lies between the line and the bars)")
    ax.grid(axis="x", alpha=0.25)
    return _to_svg(fig, "Certified bounds by method with the sampled lower bound")


def radius_curve_svg(data) -> str | None:
    """Certified accuracy against radius (a step function), with the eps points and clean accuracy."""
    if not isinstance(data, dict):
        return None
    curve = data.get("curve") or {}
    rs = [_num(v) for v in curve.get("radius") or []]
    accs = [_num(v) for v in curve.get("certified_accuracy") or []]
    pts = [(r, a) for r, a in zip(rs, accs) if r is not None and a is not None]
    eps_pts = []
    for k, v in (data.get("certified_accuracy") or {}).items():
        e, a = _num(k), _num(v)
        if e is not None and a is not None:
            eps_pts.append((e, a))
    if not pts and not eps_pts:
        return None
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    if pts:
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        # the last drop is at the largest radius: extend a little so it is visible
        xs.append(xs[-1] * 1.05 if xs[-1] > 0 else 1.0)
        ys.append(ys[-1])
        ax.step(xs, ys, where="post", color=UPPER_COLOR, linewidth=2, label="certified accuracy")
    if eps_pts:
        ax.scatter([p[0] for p in eps_pts], [p[1] for p in eps_pts], color=LOWER_COLOR, zorder=3,
                   label="requested eps")
        for e, a in eps_pts:
            ax.annotate(_pct_floor(a), (e, a), textcoords="offset points", xytext=(5, 5), fontsize=8)
    clean = _num(data.get("clean_accuracy"))
    if clean is not None:
        ax.axhline(clean, color="#888", linestyle="--", linewidth=1, label=f"clean accuracy {_pct_floor(clean)}")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_title("Certified accuracy vs radius")
    ax.grid(alpha=0.25)
    ax.legend(loc="upper right", fontsize=8)
    return _to_svg(fig, "Certified accuracy vs radius")
