"""Certified convolution norms: operator, adjoint, exact norm, FFT/Gram upper bound, independent check.

A seeded sweep over 1-D/2-D convs with stride 1-3, symmetric and asymmetric pads, dilation 1-2,
groups 1/2/depthwise and odd/even sizes; plus known answers where the norm has a closed form.
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lipverify.norms.conv import (
    GRAM_TOL,
    _gram_bounds,
    conv_adjoint,
    conv_apply,
    conv_geometry,
    conv_norm,
    conv_norm_exact,
    conv_norm_upper,
    conv_power_iteration,
    polyphase,
    verify_conv_bound,
)
from lipverify.norms.margin import inflate

torch.set_num_threads(1)


def _random_configs(count: int, seed: int, sizes_2d=(5, 13), sizes_1d=(8, 40)):
    """Random valid conv settings covering every feature; each is (weight, in_shape, s, pads, d, g)."""
    rng = random.Random(seed)
    out = []
    while len(out) < count:
        nd = rng.choice([1, 2])
        kind = rng.choice(["g1", "g1", "g2", "dw"])
        if kind == "dw":
            channels = rng.choice([2, 3, 4])
            groups, out_ch = channels, channels * rng.choice([1, 2])
        else:
            groups = 1 if kind == "g1" else 2
            channels = groups * rng.choice([1, 2, 3])
            out_ch = groups * rng.choice([1, 2, 3])
        k = tuple(rng.choice([1, 2, 3, 4, 5]) for _ in range(nd))
        s = tuple(rng.choice([1, 2, 3]) for _ in range(nd))
        d = tuple(rng.choice([1, 2]) for _ in range(nd))
        lo, hi = sizes_2d if nd == 2 else sizes_1d
        n = tuple(rng.randint(lo, hi) for _ in range(nd))
        pads = tuple(rng.randint(0, 3) for _ in range(2 * nd))
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        w = torch.randn((out_ch, channels // groups) + k, generator=gen, dtype=torch.float64)
        try:
            conv_geometry(w, (channels,) + n, s, pads, d, groups)
        except ValueError:
            continue  # empty output: kernel larger than the padded input
        out.append((w, (channels,) + n, s, pads, d, groups))
    return out


SWEEP = _random_configs(60, seed=0)


def _ids(configs):
    return [f"{c[0].dim() - 2}d-C{c[1][0]}-O{c[0].shape[0]}-k{tuple(c[0].shape[2:])}-n{c[1][1:]}"
            f"-s{c[2]}-p{c[3]}-d{c[4]}-g{c[5]}".replace(" ", "") for c in configs]


def _reference_conv(x, w, stride, pads, dilation, groups):
    """ONNX Conv definition by plain loops (numpy, float64): the known answer for conv_apply."""
    x, w = np.asarray(x, dtype=np.float64), np.asarray(w, dtype=np.float64)
    nd = w.ndim - 2
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[nd + i]) for i in range(nd)])
    out_ch, c_g = w.shape[:2]
    o_g = out_ch // groups
    out_sp = [(xp.shape[2 + i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1 for i in range(nd)]
    y = np.zeros((x.shape[0], out_ch, *out_sp))
    for o in range(out_ch):
        g = o // o_g
        for j in itertools.product(*[range(m) for m in out_sp]):
            for t in itertools.product(*[range(k) for k in w.shape[2:]]):
                idx = tuple(stride[i] * j[i] + dilation[i] * t[i] for i in range(nd))
                patch = xp[(slice(None), slice(g * c_g, (g + 1) * c_g)) + idx]
                y[(slice(None), o) + j] += patch @ w[(o, slice(None)) + t]
    return y


# ------------------------------------------------------------------------------------------ apply


@pytest.mark.parametrize("cfg", SWEEP[:12], ids=_ids(SWEEP[:12]))
def test_conv_apply_matches_onnx_definition(cfg):
    w, shape, s, pads, d, g = cfg
    nd = w.dim() - 2
    x = torch.randn((2,) + shape, dtype=torch.float64)
    ours = conv_apply(x, w, s, pads, d, g).numpy()
    ref = _reference_conv(x.numpy(), w.numpy(), s, pads, d, g)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)
    assert ours.shape[2:] == conv_geometry(w, shape, s, pads, d, g).out_spatial
    assert nd in (1, 2)


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 1, 1, 2), (3, 2, 2, 4), (2, 0, 1, 1)])
def test_conv_apply_equals_torch_conv2d(stride, padding, dilation, groups):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(8, 4 // groups, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 4, 11, 10, generator=gen, dtype=torch.float64)
    ours = conv_apply(x, w, (stride, stride), (padding,) * 4, (dilation, dilation), groups)
    ref = F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_conv_apply_asymmetric_pads_equal_zeropad_then_conv1d():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 2, 9, generator=gen, dtype=torch.float64)
    ours = conv_apply(x, w, (2,), (0, 3), (1,), 1)
    ref = F.conv1d(torch.cat([x, torch.zeros(2, 2, 3, dtype=torch.float64)], dim=2), w, stride=2)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", SWEEP[:30], ids=_ids(SWEEP[:30]))
def test_conv_adjoint_is_the_adjoint(cfg):
    w, shape, s, pads, d, g = cfg
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((3,) + shape, generator=gen, dtype=torch.float64)
    y_shape = conv_apply(x, w, s, pads, d, g).shape
    y = torch.randn(y_shape, generator=gen, dtype=torch.float64)
    lhs = (conv_apply(x, w, s, pads, d, g) * y).sum()
    aty = conv_adjoint(y, w, shape, s, pads, d, g)
    assert aty.shape == x.shape
    rhs = (x * aty).sum()
    assert abs(float(lhs - rhs)) <= 1e-10 * (1 + abs(float(lhs)))


def test_invalid_settings_raise():
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError):
        conv_geometry(w, (4, 8, 8), 1, (1, 1, 1, 1), 1, 1)  # channel mismatch
    with pytest.raises(ValueError):
        conv_geometry(w, (6, 8, 8), 1, (1, 1, 1, 1), 1, 4)  # C != (C // groups) * groups of the weight
    with pytest.raises(ValueError):
        conv_geometry(w, (3, 2, 2), 1, (0, 0, 0, 0), 1, 1)  # empty output


# -------------------------------------------------------------------------------------- norms


@pytest.mark.parametrize("cfg", SWEEP, ids=_ids(SWEEP))
def test_bound_sound_and_power_iteration_below(cfg):
    """upper >= exact on every setting; power iteration never above; verify accepts and rejects."""
    w, shape, s, pads, d, g = cfg
    exact = conv_norm_exact(w, shape, s, pads, d, g)
    upper, method = conv_norm_upper(w, shape, s, pads, d, g)
    assert upper >= exact * (1 - 1e-12), (upper, exact, method)
    assert "Gram" in method
    lower = conv_power_iteration(w, shape, s, pads, d, g, iters=30)
    assert lower <= exact * (1 + 1e-12)
    assert lower >= 0.5 * exact  # it does find the top of the spectrum
    dim = max(math.prod(shape), 10**6)
    assert verify_conv_bound(w, shape, s, pads, d, g, inflate(upper, dim))
    assert verify_conv_bound(w, shape, s, pads, d, g, inflate(exact, dim))
    assert not verify_conv_bound(w, shape, s, pads, d, g, 0.999 * exact)


def _tight_configs():
    """Settings whose grids are large against the kernel: the circulant bound's regime."""
    rng = random.Random(7)
    cfgs = []
    for i in range(14):
        nd = 1 if i < 10 else 2
        s = tuple(rng.choice([1, 2, 3]) if nd == 1 else rng.choice([1, 2]) for _ in range(nd))
        d = tuple(rng.choice([1, 2]) for _ in range(nd))
        k = tuple(rng.choice([2, 3, 5]) if nd == 1 else 3 for _ in range(nd))
        groups = [1, 2, 3][i % 3] if nd == 1 else 1
        channels = groups * (2 if nd == 1 else 1)
        out_ch = groups * (3 if nd == 1 else 2)
        n = tuple(rng.choice([400, 401]) if nd == 1 else rng.choice([40, 41]) for _ in range(nd))
        pads = tuple(rng.randint(0, 2) for _ in range(2 * nd))
        gen = torch.Generator().manual_seed(100 + i)
        w = torch.randn((out_ch, channels // groups) + k, generator=gen, dtype=torch.float64)
        cfgs.append((w, (channels,) + n, s, pads, d, groups))
    return cfgs


TIGHT = _tight_configs()


@pytest.mark.parametrize("cfg", TIGHT, ids=_ids(TIGHT))
def test_bound_within_one_percent_on_large_enough_grids(cfg):
    w, shape, s, pads, d, g = cfg
    exact = conv_norm_exact(w, shape, s, pads, d, g)
    upper, _ = conv_norm_upper(w, shape, s, pads, d, g)
    assert exact * (1 - 1e-12) <= upper <= 1.01 * exact


@pytest.mark.parametrize("channels,stride", [(1, 1), (8, 1), (32, 1), (16, 2), (64, 1)])
def test_gram_iteration_matches_circulant_svd(channels, stride):
    """The Gram bound is within GRAM_TOL of max_w sigma_max(Khat(w)) computed by SVD."""
    gen = torch.Generator().manual_seed(channels)
    w = torch.randn(channels, channels, 3, 3, generator=gen, dtype=torch.float64)
    geo = conv_geometry(w, (channels, 9, 9), stride, (1, 1, 1, 1), 1, 1)
    poly = polyphase(w, geo)
    sym = torch.fft.rfftn(poly.kernel, s=poly.grid, dim=(3, 4)).permute(3, 4, 0, 1, 2)
    sym = sym.reshape((-1,) + sym.shape[-2:])
    svd = float(torch.linalg.svdvals(sym).max())
    upper, _ = conv_norm_upper(w, (channels, 9, 9), stride, (1, 1, 1, 1), 1, 1)
    assert svd * (1 - 1e-12) <= upper <= svd * (1 + GRAM_TOL + 1e-12)
    # with the early stop switched off (floor 0 and a huge cap) it converges further
    bounds, lower = _gram_bounds(sym, floor=0.0, tol=0.0, max_iters=20)
    assert svd * (1 - 1e-12) <= float(bounds.max()) <= svd * (1 + 1e-6)
    assert lower <= svd * (1 + 1e-12)


def test_gram_bounds_every_matrix_is_bounded():
    """Per-matrix Gram values are upper bounds even for the matrices stopped early."""
    gen = torch.Generator().manual_seed(11)
    mats = torch.randn(50, 6, 4, generator=gen, dtype=torch.complex128)
    mats[7] = 0
    bounds, lower = _gram_bounds(mats, floor=0.0)
    sv = torch.linalg.svdvals(mats)[:, 0]
    assert bool((bounds >= sv * (1 - 1e-12)).all())
    assert float(bounds[7]) == 0.0
    assert lower <= float(sv.max()) * (1 + 1e-12)


# ------------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("n", [3, 4, 9, 16])
def test_known_answer_two_tap_filter(n):
    """[1, 1] with one zero of padding each side: the (n+1) x n bidiagonal of ones,
    sigma_max = 2 cos(pi / (2 (n + 1))); its symbol 1 + e^{iw} peaks at 2."""
    w = torch.ones(1, 1, 2, dtype=torch.float64)
    exact = conv_norm_exact(w, (1, n), 1, (1, 1), 1, 1)
    assert exact == pytest.approx(2 * math.cos(math.pi / (2 * (n + 1))), rel=1e-12)
    upper, _ = conv_norm_upper(w, (1, n), 1, (1, 1), 1, 1)
    assert upper == pytest.approx(2.0, rel=1e-9)


def test_known_answer_pointwise_conv_is_the_channel_matrix():
    """A 1x1 conv (any stride) is the channel-mixing matrix on every kept pixel: norm = ||W||_2."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(5, 3, 1, 1, generator=gen, dtype=torch.float64)
    sigma = float(torch.linalg.svdvals(w[:, :, 0, 0])[0])
    for stride in (1, 2, 3):
        upper, _ = conv_norm_upper(w, (3, 7, 8), stride, (0, 0, 0, 0), 1, 1)
        assert sigma * (1 - 1e-12) <= upper <= sigma * (1 + GRAM_TOL)
        assert conv_norm_exact(w, (3, 7, 8), stride, (0, 0, 0, 0), 1, 1) == pytest.approx(sigma, rel=1e-12)


def test_known_answer_stride_equals_kernel_is_blockwise():
    """Stride 2 with a 2x2 kernel and no padding: disjoint patches, norm = ||W reshaped O x 4C||_2."""
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(6, 3, 2, 2, generator=gen, dtype=torch.float64)
    sigma = float(torch.linalg.svdvals(w.reshape(6, -1))[0])
    upper, method = conv_norm_upper(w, (3, 8, 8), 2, (0, 0, 0, 0), 1, 1)
    assert "polyphase" in method
    assert sigma * (1 - 1e-12) <= upper <= sigma * (1 + GRAM_TOL)
    assert conv_norm_exact(w, (3, 8, 8), 2, (0, 0, 0, 0), 1, 1) == pytest.approx(sigma, rel=1e-12)


def test_three_dimensional_conv_bound_is_sound():
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(2, 2, 3, 2, 3, generator=gen, dtype=torch.float64)
    shape, s, pads, d = (2, 5, 6, 5), (1, 2, 1), (1, 0, 1, 1, 1, 0), (1, 1, 2)
    exact = conv_norm_exact(w, shape, s, pads, d, 1)
    upper, _ = conv_norm_upper(w, shape, s, pads, d, 1)
    assert exact * (1 - 1e-12) <= upper
    assert verify_conv_bound(w, shape, s, pads, d, 1, inflate(upper, 10**6))


# ------------------------------------------------------------------------- NormResult / verify


def test_conv_norm_exact_path_fields():
    w, shape, s, pads, d, g = SWEEP[1]
    res = conv_norm(w, shape, s, pads, d, g)
    exact = conv_norm_exact(w, shape, s, pads, d, g)
    assert res.method.startswith("exact SVD")
    assert res.lower <= exact <= res.upper
    assert res.upper <= exact * (1 + 1e-6)
    assert 1.0 <= res.gap <= 1 + 1e-6
    assert verify_conv_bound(w, shape, s, pads, d, g, res.upper)


def test_conv_norm_bound_path_fields():
    w, shape, s, pads, d, g = SWEEP[2]
    res = conv_norm(w, shape, s, pads, d, g, exact_max_entries=0)
    exact = conv_norm_exact(w, shape, s, pads, d, g)
    assert "Gram" in res.method
    assert res.lower <= exact * (1 + 1e-12) and exact <= res.upper
    assert res.gap >= 1.0
    assert verify_conv_bound(w, shape, s, pads, d, g, res.upper)


def test_verify_on_the_frequency_path():
    """Too big to unroll for the check: the per-frequency Cholesky (direct DFT) path decides."""
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(16, 8, 3, 3, generator=gen, dtype=torch.float64)
    shape, s, pads = (16, 24, 23), (2, 1), (1, 0, 1, 2)
    res = conv_norm(w, shape, s, pads, (1, 1), 2)
    assert "Gram" in res.method
    assert res.lower <= res.upper <= res.lower * 1.05
    assert verify_conv_bound(w, shape, s, pads, (1, 1), 2, res.upper)
    assert not verify_conv_bound(w, shape, s, pads, (1, 1), 2, 0.999 * res.lower)


def test_zero_weight_and_float32_weights():
    w = torch.zeros(2, 2, 3, 3)
    assert conv_norm_upper(w, (2, 6, 6), 1, (1, 1, 1, 1), 1, 1)[0] == 0.0
    assert conv_norm(w, (2, 6, 6), 1, (1, 1, 1, 1), 1, 1).upper <= 1e-290
    w32 = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    exact = conv_norm_exact(w32, (2, 7, 7), 1, (1, 1, 1, 1), 1, 1)
    assert exact == pytest.approx(conv_norm_exact(w32.double(), (2, 7, 7), 1, (1, 1, 1, 1), 1, 1), rel=0)
    res = conv_norm(w32, (2, 7, 7), 1, (1, 1, 1, 1), 1, 1, exact_max_entries=0)
    assert res.upper >= exact
