"""Independent check of a claimed bound on the norm of a convolution (zero padding, any stride,
dilation and groups), re-derived here rather than shared with the bound methods.

Small convolutions are unrolled through the op's own ``apply`` (the code the self-check ran against
the user's model) and checked by ``norm_at_most``. Large ones by three exact steps and a check:

1. Polyphase: for each spatial dim, kernel tap t reads input i = s p + d t - b (output p, stride s,
   dilation d, begin pad b). With d t - b = s a_t + r_t (0 <= r_t < s), the conv is a stride-1
   correlation y[p] = sum_t w_t x_{r_t}[p + a_t] over the s phases x_r[q] = x[s q + r], q < ceil(n/s)
   (short phases padded with zeros: an isometric embedding).
2. Circulant embedding: on a grid of N >= ceil(n/s) + max(0, -a_min) and N >= out + a_max, no tap of a
   kept output wraps onto a real input, so the correlation is a restriction of the circular one: ||A|| <= ||C||.
3. ||C|| = max over the grid frequencies w of sigma_max(Khat(w)), Khat(w) = sum_a K_a e^{-2 pi i <w, a/N>}
   (block diagonal per group; K real, so half of the last axis suffices).
4. Check: ``norm_at_most`` on every Khat(w), computed by a direct DFT sum (the methods use an FFT),
   with the bound lowered by the DFT's own rounding error.
"""

from __future__ import annotations

import itertools
import math

import torch

from lipverify.verifier.linalg import SAFETY, gamma, norm_at_most

UNROLL_MAX_ENTRIES = 4_000_000
CHUNK_ENTRIES = 8_000_000  # complex entries per batch of symbols


def unrolled(apply, in_shape) -> torch.Tensor:
    """The matrix (out, in) of a linear map given by ``apply`` on a batch."""
    n = math.prod(in_shape)
    eye = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(in_shape))
    with torch.no_grad():
        return apply(eye).reshape(n, -1).T


def _geometry(weight, in_shape, stride, pads, dilation):
    nd = weight.dim() - 2
    spatial, kernel = tuple(in_shape[1:]), tuple(weight.shape[2:])
    begin, end = tuple(pads[:nd]), tuple(pads[nd:])
    out = tuple((spatial[i] + begin[i] + end[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
                for i in range(nd))
    return nd, spatial, kernel, begin, out


def _polyphase(weight, in_shape, stride, pads, dilation, groups):
    """(kernel (G, O_g, C_g * prod(s), *taps) float64, grid N per dim)."""
    nd, spatial, kernel, begin, out = _geometry(weight, in_shape, stride, pads, dilation)
    w = weight.to(torch.float64)
    o, c_g = w.shape[0], w.shape[1]
    w = w.reshape((groups, o // groups, c_g) + kernel)
    taps, grid, place = [], [], []
    for i in range(nd):
        s, d, b = stride[i], dilation[i], begin[i]
        a = [(d * t - b) // s for t in range(kernel[i])]
        r = [(d * t - b) % s for t in range(kernel[i])]
        lo, hi = min(a), max(a)
        nq = -(-spatial[i] // s)
        taps.append(hi - lo + 1)
        grid.append(max(nq + max(0, -lo), out[i] + hi, 1))
        place.append([(r[t], a[t] - lo) for t in range(kernel[i])])
    poly = torch.zeros((groups, o // groups, c_g) + tuple(stride) + tuple(taps), dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(k) for k in kernel]).reshape(-1, nd).tolist():
        phase = tuple(place[i][idx[i]][0] for i in range(nd))
        tap = tuple(place[i][idx[i]][1] for i in range(nd))
        poly[(slice(None),) * 3 + phase + tap] += w[(slice(None),) * 3 + tuple(idx)]
    return poly.reshape((groups, o // groups, c_g * math.prod(stride)) + tuple(taps)), tuple(grid)


def _phases(n: int, taps: int, freqs: torch.Tensor) -> torch.Tensor:
    """e^{-2 pi i w a / n} for frequencies w and taps a, with w a reduced mod n in integers."""
    angle = (-2.0 * math.pi / n) * ((freqs[:, None] * torch.arange(taps)[None, :]) % n).to(torch.float64)
    return torch.polar(torch.ones_like(angle), angle)


def _symbols(poly: torch.Tensor, grid: tuple[int, ...]):
    """Khat over half the grid (last axis 0..N//2), in chunks: (n, G, O_g, C') complex128, by direct sums."""
    nd = len(grid)
    taps = poly.shape[3:]
    k = poly.to(torch.complex128)
    per_freq = poly.shape[0] * poly.shape[1] * poly.shape[2]
    last = _phases(grid[-1], taps[-1], torch.arange(grid[-1] // 2 + 1))
    # contract the last axis for all its frequencies, then the others one frequency row at a time
    k_last = torch.tensordot(k, last, dims=([k.dim() - 1], [1]))  # (..., taps[:-1], W_last)
    lead = [torch.arange(g) for g in grid[:-1]]
    rows = torch.cartesian_prod(*lead).reshape(-1, nd - 1) if nd > 1 else torch.zeros((1, 0), dtype=torch.long)
    chunk = max(1, CHUNK_ENTRIES // max(per_freq * (grid[-1] // 2 + 1), 1))
    for start in range(0, len(rows), chunk):
        batch = []
        for row in rows[start:start + chunk].tolist():
            s = k_last
            for i, w in enumerate(row):  # contract leading tap axes one at a time
                ph = _phases(grid[i], taps[i], torch.tensor([w]))[0]
                s = torch.tensordot(s, ph, dims=([3], [0]))
            batch.append(s.permute(3, 0, 1, 2))  # (W_last, G, O_g, C')
        yield torch.cat(batch)


def _dft_error(poly: torch.Tensor) -> float:
    """Bound on ||Khat_computed(w) - Khat(w)||_2: entrywise <= gamma_(A + 8) sum_a |K_a|, in Frobenius."""
    n_taps = math.prod(poly.shape[3:])
    absum = poly.abs().reshape(poly.shape[:3] + (-1,)).sum(-1)  # (G, O_g, C')
    fro = float(torch.sqrt((absum * absum).sum((1, 2))).max())
    return SAFETY * gamma(n_taps + 8 * poly.dim(), True) * fro


def conv_norm_at_most(weight, in_shape, stride, pads, dilation, groups, bound, apply=None) -> bool:
    """True only if the zero-padded convolution's operator norm on ``in_shape`` is <= bound."""
    bound = float(bound)
    if not (math.isfinite(bound) and bound >= 0):
        return False
    nd, spatial, kernel, begin, out = _geometry(weight, in_shape, stride, pads, dilation)
    n_in, n_out = math.prod(in_shape), weight.shape[0] * math.prod(out)
    if apply is not None and n_in * n_out <= UNROLL_MAX_ENTRIES:
        return norm_at_most(unrolled(apply, in_shape), bound)
    poly, grid = _polyphase(weight, in_shape, stride, pads, dilation, groups)
    target = bound - _dft_error(poly)
    if target < 0:
        return False
    for sym in _symbols(poly, grid):
        if not norm_at_most(sym.reshape((-1,) + sym.shape[-2:]), target):
            return False
    return True


# ----------------------------------------------------------------------------------------------
# Convolutions between polyphase representations (used by the per-frequency LipSDP checks)
# ----------------------------------------------------------------------------------------------


def dense_group_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The (O, C, *k) float64 kernel of a grouped convolution with the zero blocks written out."""
    w = weight.to(torch.float64)
    o, c_g = w.shape[0], w.shape[1]
    if groups == 1:
        return w
    full = torch.zeros((o, c_g * groups) + tuple(w.shape[2:]), dtype=torch.float64)
    o_g = o // groups
    for g in range(groups):
        full[g * o_g:(g + 1) * o_g, g * c_g:(g + 1) * c_g] = w[g * o_g:(g + 1) * o_g]
    return full


def coarse_kernel(weight, groups, stride, pads, dilation, p_in, p_out):
    """A convolution as a stride-1 correlation between polyphase representations on one coarse grid.

    A tensor of "phase factor" p stores fine position q at coarse index q // p, phase q % p (channel
    index c * prod(p) + flat(phase)). With p_in = stride * p_out, output fine position
    q = p_out Q + r_out reads input s q + d t - b = p_in Q + e, e = s r_out + d t - b, i.e. coarse
    index Q + floor(e / p_in) at phase e mod p_in: translation by one coarse step on both sides.
    Returns (K, lo): K of shape (O * prod(p_out), C * prod(p_in), *taps) float64 with K[..., a]
    the tap at coarse offset lo + a (every entry is one weight: distinct taps land on distinct
    (phase, offset) pairs).
    """
    w = dense_group_weight(weight, groups)
    nd = w.dim() - 2
    kernel = tuple(w.shape[2:])
    begin = tuple(pads[:nd])
    place, lo, taps = [], [], []
    for i in range(nd):
        s, d, b, pi, po = stride[i], dilation[i], begin[i], p_in[i], p_out[i]
        if pi != s * po:
            raise ValueError("phase factors must satisfy p_in = stride * p_out")
        entries = [(ro, t, (s * ro + d * t - b) % pi, (s * ro + d * t - b) // pi)
                   for ro in range(po) for t in range(kernel[i])]
        a_lo = min(e[3] for e in entries)
        lo.append(a_lo)
        taps.append(max(e[3] for e in entries) - a_lo + 1)
        place.append(entries)
    o, c = w.shape[0], w.shape[1]
    k = torch.zeros((o,) + tuple(p_out) + (c,) + tuple(p_in) + tuple(taps), dtype=torch.float64)
    for combo in itertools.product(*place):
        ro = tuple(e[0] for e in combo)
        t = tuple(e[1] for e in combo)
        ri = tuple(e[2] for e in combo)
        a = tuple(e[3] - lo[i] for i, e in enumerate(combo))
        k[(slice(None),) + ro + (slice(None),) + ri + a] += w[(slice(None), slice(None)) + t]
    return k.reshape((o * math.prod(p_out), c * math.prod(p_in)) + tuple(taps)), tuple(lo)
