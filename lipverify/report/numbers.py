"""Numbers as people read them, never more optimistic than the certificate.

Every renderer (terminal, HTML, Markdown, messages) formats through these helpers: a certified
upper bound is rounded up, a lower bound, a radius or a certified accuracy is rounded down, so
the printed decimal, read back, lies on the safe side of the stored float. Rounding works on the
shortest decimal that reads back as the same float (``repr``), with ``decimal`` arithmetic, so it
never rounds the wrong way through binary error.
"""

from __future__ import annotations

import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation

SIG = 6
_MODES = {"up": ROUND_CEILING, "down": ROUND_FLOOR}


def _finite(v) -> float | None | str:
    """``v`` as a finite float, or the text to show instead."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(f):
        return "∞" if f > 0 else ("−∞" if f < 0 else "NaN")
    return f


def round_sig(f: float, sig: int, direction: str | None) -> float:
    """``f`` rounded to ``sig`` significant digits, up / down / to nearest (None)."""
    if f == 0 or direction is None:
        return float(format(f, f".{sig}g"))
    d = Decimal(repr(f))
    try:
        q = d.quantize(Decimal(1).scaleb(d.adjusted() - (sig - 1)), rounding=_MODES[direction])
    except InvalidOperation:  # pragma: no cover - exponents beyond decimal's default context
        return f
    return float(q)


def fmt_num(v, direction: str | None = None, sig: int = SIG) -> str:
    """``v`` to ``sig`` significant digits; ``direction`` "up"/"down" rounds toward safety."""
    f = _finite(v)
    if not isinstance(f, float):
        return f
    text = format(round_sig(f, sig, direction), f".{sig}g")
    if (direction == "up" and float(text) < f) or (direction == "down" and float(text) > f):
        text = repr(f)  # subnormals: the rounded decimal is not representable; show the float itself
    return text


def fmt_up(v, sig: int = SIG) -> str:
    """A certified upper bound (rounded up)."""
    return fmt_num(v, "up", sig)


def fmt_down(v, sig: int = SIG) -> str:
    """A lower bound, a radius, a tightness ratio (rounded down)."""
    return fmt_num(v, "down", sig)


def fmt_pct(v, direction: str | None = "down", decimals: int = 2, space: bool = False) -> str:
    """A fraction as a percentage, rounded down by default (accuracies)."""
    f = _finite(v)
    if not isinstance(f, float):
        return f
    scaled = Decimal(repr(f)) * 100
    step = Decimal(1).scaleb(-decimals)
    if direction in _MODES:
        scaled = scaled.quantize(step, rounding=_MODES[direction])
    return f"{float(scaled):.{decimals}f}{' ' if space else ''}%"


_HOLDS = {"≤": lambda lo, hi, t: hi <= t, ">": lambda lo, hi, t: lo > t,
          "≥": lambda lo, hi, t: lo >= t, "<": lambda lo, hi, t: hi < t}


def _decisive(value: float, op: str, threshold: float, start: int = 4) -> int:
    """The fewest significant digits (>= ``start``) at which ``value`` rounded either way still
    satisfies ``value op threshold``: the printed comparison is then true however one reads it."""
    for sig in range(start, 18):
        if _HOLDS[op](round_sig(value, sig, "down"), round_sig(value, sig, "up"), threshold):
            return sig
    return 17


def fmt_threshold(t) -> str:
    """A user-given threshold as the shortest decimal that reads back as the same float."""
    f = _finite(t)
    return f if not isinstance(f, float) else repr(f).removesuffix(".0")


def gate_check(gate: dict, with_name: bool = True) -> str:
    """``name: value OP threshold`` with the operator the way the result came out, e.g.
    ``max-L: 1.0084601 > 1.00846`` or ``min-certified-acc@0.5: 0.2033 < 0.5``; enough digits
    to show why, the value rounded in its safe direction."""
    name, value, threshold = gate.get("name", "gate"), gate.get("value"), gate.get("threshold")
    # accuracy gates say ">="; max-L says nothing ("<="); older certificates: min-* gates are ">="
    direction = gate.get("direction") or (">=" if str(name).startswith("min") else "<=")
    at_least = direction == ">="
    v, t = _finite(value), _finite(threshold)
    if not isinstance(v, float) or not isinstance(t, float):
        return f"{name}: {v} vs {t}"
    passed = bool(gate.get("passed"))
    op = ("≥" if passed else "<") if at_least else ("≤" if passed else ">")
    sig = _decisive(v, op, t)
    text = f"{fmt_num(v, 'down' if at_least else 'up', sig)} {op} {fmt_threshold(t)}"
    return f"{name}: {text}" if with_name else text
