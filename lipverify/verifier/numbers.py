"""Claimed numbers and rigorous float64 arithmetic for the verifier.

Every number a certificate claims (a factor, a norm, a multiplier, rho, a total) is only a claim:
``claim`` accepts it only when it is a real, finite number of the right sign. Totals are
recomputed with upward rounding (``up``: the next float above a correctly rounded result is
above the exact result), so a recomputed bound is an upper bound on the exact real one.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

from lipverify.errors import SoundnessError

EPS = float(np.finfo(np.float64).eps)  # unit roundoff u = EPS / 2; we use EPS for slack


def fail(msg: str):
    raise SoundnessError(f"certificate check failed: {msg}")


def claim(value, what: str, *, positive: bool = False) -> float:
    """A claimed scalar: an int/float (not a bool or string), finite, >= 0 (or > 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        fail(f"{what} is not a number ({value!r})")
    v = float(value)
    if not math.isfinite(v):
        fail(f"{what} = {v} is not finite")
    if v < 0 or (positive and v == 0):
        fail(f"{what} = {v} must be {'> 0' if positive else '>= 0'}")
    return v


def claim_vector(values, what: str, *, positive: bool = False, length: int | None = None) -> torch.Tensor:
    """A claimed vector of numbers (finite, >= 0 or > 0), as float64."""
    if not isinstance(values, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                    for v in values):
        fail(f"{what} is not a list of numbers")
    if length is not None and len(values) != length:
        fail(f"{what} has {len(values)} entries, expected {length}")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        fail(f"{what} has non-finite entries")
    if bool((t < 0).any()) or (positive and bool((t == 0).any())):
        fail(f"{what} has entries {'<= 0' if positive else '< 0'}")
    return t


def up(x: float) -> float:
    """The next float above ``x``: above the exact value of a correctly rounded operation."""
    return math.nextafter(float(x), math.inf)


def mul_up(a: float, b: float) -> float:
    return up(a * b)


def add_up(values: Iterable[float]) -> float:
    total = 0.0
    for v in values:
        total = up(total + v)
    return total


def sqrt_up(x: float) -> float:
    return up(math.sqrt(x))


def at_least(claimed: float, recomputed: float, what: str) -> None:
    """The claim must not be below the upward-rounded recomputation."""
    if not claimed >= recomputed:
        fail(f"{what}: the witness gives {recomputed!r}, the certificate claims {claimed!r}")


def only_keys(witness: dict, allowed: set[str], what: str) -> None:
    """A witness holds exactly what its checker verifies: anything else is refused (not silently ignored)."""
    extra = set(witness) - allowed
    if extra:
        fail(f"{what}: the witness has entries the verifier does not check: {sorted(extra)}")
