"""The trusted base on its own: rigorous Cholesky proofs, convolution checks, claimed numbers, and the
rule that it imports nothing from the methods it checks."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lipverify.errors import SoundnessError
from lipverify.norms.conv import conv_apply, conv_norm, conv_norm_exact
from lipverify.norms.dense import dense_norm
from lipverify.verifier.conv import conv_norm_at_most
from lipverify.verifier.linalg import norm_at_most, proves_psd
from lipverify.verifier.numbers import add_up, claim, claim_vector, mul_up

PKG = Path(__file__).resolve().parents[1] / "lipverify" / "verifier"
# what the verifier checks; tests/test_check.py holds the same rule at run time
METHOD_PACKAGES = ("lipverify.bounds", "lipverify.norms", "lipverify.attack", "lipverify.robustness",
                   "lipverify.certify", "lipverify.finetune")


def test_verifier_imports_nothing_from_the_methods():
    for path in PKG.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(METHOD_PACKAGES), (path.name, name)


@pytest.mark.parametrize("n", [1, 7, 200, 1200])
def test_norm_bound_is_proven_at_the_margin_and_refused_below(n):
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, max(1, n // 2 + 3), generator=gen, dtype=torch.float64) / math.sqrt(n)
    exact = float(torch.linalg.svdvals(a)[0])
    assert norm_at_most(a, dense_norm(a).upper)  # what the methods certify always passes
    assert not norm_at_most(a, exact * (1 - 1e-9))
    assert not norm_at_most(a, -exact) and not norm_at_most(a, float("nan")) and not norm_at_most(a, True)


def test_psd_proof_covers_the_stated_error():
    h = torch.diag(torch.tensor([1.0, 1e-3], dtype=torch.float64))
    assert proves_psd(h, 0.0)
    assert proves_psd(h, 9e-4)
    assert not proves_psd(h, 1.1e-3)  # a matrix within 1.1e-3 of h may be indefinite
    assert not proves_psd(-h)
    assert not proves_psd(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64))


def test_zero_map_and_zero_bound():
    z = torch.zeros(3, 4, dtype=torch.float64)
    assert norm_at_most(z, 0.0)
    assert not norm_at_most(torch.eye(3, dtype=torch.float64) * 1e-200, 0.0)


@pytest.mark.parametrize("shape,stride,pads,dil,groups", [
    ((3, 9, 9), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    ((4, 10, 7), (2, 1), (0, 2, 1, 0), (1, 2), 2),
    ((6, 8, 8), (3, 3), (2, 2, 2, 2), (1, 1), 3),
    ((2, 12), (2,), (1, 3), (2,), 1),
])
def test_conv_check_by_frequency_is_a_proof(shape, stride, pads, dil, groups, monkeypatch):
    import lipverify.verifier.conv as vc

    gen = torch.Generator().manual_seed(1)
    nd = len(shape) - 1
    w = torch.randn((6 if groups != 3 else 9, shape[0] // groups) + (3,) * nd, generator=gen, dtype=torch.float64)
    exact = conv_norm_exact(w, shape, stride, pads, dil, groups)
    monkeypatch.setattr(vc, "UNROLL_MAX_ENTRIES", 0)  # force the per-frequency path
    assert not conv_norm_at_most(w, shape, stride, pads, dil, groups, exact * (1 - 1e-6))
    # the circulant bound is above the exact norm; the method's certified value must pass
    upper = conv_norm(w, shape, stride, pads, dil, groups).upper
    if upper > exact * (1 + 1e-6):  # (small inputs are certified exactly, by the unrolled path)
        assert conv_norm_at_most(w, shape, stride, pads, dil, groups, upper)
    monkeypatch.setattr(vc, "UNROLL_MAX_ENTRIES", 4_000_000)
    apply = lambda x: conv_apply(x, w, stride, pads, dil, groups)  # noqa: E731
    assert conv_norm_at_most(w, shape, stride, pads, dil, groups, exact * (1 + 1e-9), apply=apply)
    assert not conv_norm_at_most(w, shape, stride, pads, dil, groups, exact * (1 - 1e-9), apply=apply)


def test_claimed_numbers():
    with pytest.raises(SoundnessError):
        claim(-1.0, "x")
    for bad in (float("nan"), float("inf"), "1.0", True, None, [1.0]):
        with pytest.raises(SoundnessError):
            claim(bad, "x")
    assert claim(0, "x") == 0.0
    with pytest.raises(SoundnessError):
        claim(0.0, "x", positive=True)
    with pytest.raises(SoundnessError):
        claim_vector([1.0, -1e-300], "v")
    with pytest.raises(SoundnessError):
        claim_vector([1.0, "2"], "v")


def test_upward_rounding_bounds_the_exact_value():
    from fractions import Fraction

    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = float(rng.uniform(0, 10)), float(rng.uniform(0, 10))
        assert Fraction(mul_up(a, b)) >= Fraction(a) * Fraction(b)
        assert Fraction(add_up([a, b, a])) >= Fraction(a) + Fraction(b) + Fraction(a)
