"""Certified operator norms of the linear maps in a network (float64, explicit rounding margin)."""

from lipverify.norms.margin import NormResult, inflate

__all__ = ["NormResult", "inflate"]
