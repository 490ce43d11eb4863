"""Certified L2 operator norms of convolutions (1-D, 2-D, ...; stride, asymmetric padding, dilation, groups).

The operator is the *linear* part of an ONNX/torch ``Conv`` acting on one sample of shape
``in_shape = (C, *n)``: zero-pad with ONNX-style ``pads = (begin_0, ..., end_0, ...)``, then
cross-correlate with ``weight`` of shape ``(O, C // groups, *k)`` at the given stride and dilation.

Two ways to its norm ||A||_2 (largest singular value of the unrolled matrix A):

* **exact**: unroll A (one column per input basis vector, block-diagonal per group) and take the
  largest singular value with LAPACK in float64. Only affordable for small inputs.
* **certified upper bound** (any size), in three exact reductions and one bound:
  1. *Polyphase.* Split the (unpadded) input of every spatial dim into its ``s`` phases
     ``x_r[q] = x[s*q + r]``. A stride-``s`` conv is then a stride-1 correlation from the
     ``C * prod(s)`` phase channels, with the dilated kernel split into taps
     ``a = floor((dil*t - begin) / s)``; the padding becomes taps at negative offsets. The phase
     split is an isometry (a permutation plus zero slots), so nothing is lost for stride > 1.
  2. *Circulant embedding.* That stride-1 correlation, read on ``out`` outputs from inputs of
     length ``nq`` with taps in ``[a_lo, a_hi]``, is a restriction ``R C E`` of a circular
     correlation C on a grid of ``N`` points as soon as no tap of a kept output wraps onto a
     real input: ``N >= max(A, out, nq + max(0, -a_lo), out + a_hi)`` (A = number of taps).
     So ||A|| <= ||C||, which is usually a smaller grid than "padded size + k - 1".
  3. *Fourier.* ||C|| = max over the grid's frequencies w of sigma_max(Khat(w)), Khat(w) the
     ``O x C*prod(s)`` DFT of the polyphase kernel (Sedghi et al. 2019), block-diagonal per group.
     The kernel is real, so Khat(-w) = conj Khat(w): half the grid (``rfftn``) suffices.
  4. *Gram iteration* (Delattre et al. 2023) bounds sigma_max(Khat(w)) at every frequency from
     above: with G_0 = Khat, G_{t+1} = G_t^H G_t, sigma_1 <= ||G_t||_F^(1/2^t). We carry the
     Frobenius rescaling in log space, do the complex products with real matmuls (much faster
     than complex128 matmul on CPU), and stop a frequency as soon as its bound is within
     ``GRAM_TOL`` of the best lower estimate found anywhere (a per-frequency Rayleigh quotient, or
     the power-iteration value passed in). Every per-frequency value kept is a guaranteed bound,
     so the early stop changes only tightness, never soundness.

Everything certified is float64/complex128 and is inflated by
:func:`lipverify.norms.margin.inflate` before it is called certified (in :func:`conv_norm`).
:func:`verify_conv_bound` re-checks a bound by a different algorithm: a Cholesky factorization
of ``u^2 I - A^T A`` (unrolled, small cases) or of ``u^2 I - Khat(w)^H Khat(w)`` at every
frequency, with Khat from a direct DFT sum instead of the FFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from lipverify.norms.margin import NormResult, inflate, relative_margin
from lipverify.ops.conv_map import (  # noqa: F401  (re-exported)
    _CONV,
    ConvGeometry,
    conv_adjoint,
    conv_apply,
    conv_geometry,
)

# Stop refining a frequency once its Gram bound is within this factor of the best lower estimate.
GRAM_TOL = 1e-3
# Hard cap on Gram steps: the Frobenius bound overshoots by at most rank^(1/2^t) (1.0003 at
# t = 15 for rank 512), so the cap is never what decides tightness in practice.
GRAM_MAX_ITERS = 16
# Rough memory budget (bytes) per chunk of frequencies.
CHUNK_BYTES = 64 * 2**20
# Unrolled Cholesky in ``verify_conv_bound`` when the unrolled matrix is at most this big.
VERIFY_UNROLLED_MAX_ENTRIES = 4_000_000


# --------------------------------------------------------------------------------------------
# Exact norm (unrolled)
# --------------------------------------------------------------------------------------------


def _unrolled_blocks(weight: torch.Tensor, geo: ConvGeometry, device="cpu") -> Iterator[torch.Tensor]:
    """The unrolled matrix, one diagonal block per group, each of shape (n_out_g, n_in_g), float64.

    A grouped conv only mixes channels within a group, so (after permuting rows and columns) its
    matrix is block diagonal and its norm is the largest of the blocks' norms.
    """
    w = weight.detach().to(device=device, dtype=torch.float64)
    c_g = geo.channels // geo.groups
    o_g = geo.out_channels // geo.groups
    n_in_g = c_g * math.prod(geo.spatial)
    basis = torch.eye(n_in_g, dtype=torch.float64, device=device).reshape((n_in_g, c_g) + geo.spatial)
    for g in range(geo.groups):
        w_g = w[g * o_g:(g + 1) * o_g]
        cols = _CONV[geo.ndim](F.pad(basis, geo.torch_pad), w_g, stride=geo.stride,
                               dilation=geo.dilation)
        yield cols.reshape(n_in_g, -1).T


def conv_norm_exact(weight, in_shape, stride, pads, dilation, groups, device="cpu") -> float:
    """Largest singular value of the unrolled matrix (float64 LAPACK SVD, not inflated)."""
    geo = conv_geometry(weight, in_shape, stride, pads, dilation, groups)
    best = 0.0
    for block in _unrolled_blocks(weight, geo, device):
        best = max(best, float(torch.linalg.svdvals(block)[0]))
    return best


# --------------------------------------------------------------------------------------------
# Polyphase kernel and circulant grid
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Polyphase:
    """The stride-1 correlation equivalent to a conv, and a circulant grid that contains it."""

    kernel: torch.Tensor  # (groups, O_g, C_g * prod(s), *A) float64, tap index a - a_lo
    grid: tuple[int, ...]  # N per dim

    @property
    def groups(self) -> int:
        return int(self.kernel.shape[0])

    @property
    def rows(self) -> int:  # O_g
        return int(self.kernel.shape[1])

    @property
    def cols(self) -> int:  # C_g * prod(s)
        return int(self.kernel.shape[2])

    @property
    def n_freq(self) -> int:
        """Frequencies visited (half the grid along the last dim: the kernel is real)."""
        return math.prod(self.grid[:-1]) * (self.grid[-1] // 2 + 1)


def polyphase(weight: torch.Tensor, geo: ConvGeometry, device="cpu") -> Polyphase:
    """Polyphase kernel of the conv and the smallest circulant grid it embeds in (see module doc)."""
    w = weight.detach().to(device=device, dtype=torch.float64)
    o_g = geo.out_channels // geo.groups
    c_g = geo.channels // geo.groups
    taps_lo, taps, grid, phase_of_t, tap_of_t = [], [], [], [], []
    for i in range(geo.ndim):
        s, d, b, k = geo.stride[i], geo.dilation[i], geo.begin[i], geo.kernel[i]
        u = [d * t - b for t in range(k)]
        a = [v // s for v in u]  # floor division: tap offset on the phase grid
        r = [v % s for v in u]  # phase read by kernel index t
        a_lo, a_hi = min(a), max(a)
        n_taps = a_hi - a_lo + 1
        nq = -(-geo.spatial[i] // s)  # ceil(n / s): length of each phase (short ones zero-filled)
        out = geo.out_spatial[i]
        grid.append(max(n_taps, out, nq + max(0, -a_lo), out + a_hi))
        taps_lo.append(a_lo)
        taps.append(n_taps)
        phase_of_t.append(r)
        tap_of_t.append([v - a_lo for v in a])
    phases = math.prod(geo.stride)
    kernel = torch.zeros((geo.groups, o_g, c_g) + tuple(geo.stride) + tuple(taps),
                         dtype=torch.float64, device=device)
    w = w.reshape((geo.groups, o_g, c_g) + geo.kernel)
    # Scatter each kernel index t (per dim) to its (phase, tap) slot; distinct t never collide
    # because d*t - b = s*a + r determines t.
    for t in torch.cartesian_prod(*[torch.arange(k) for k in geo.kernel]).reshape(-1, geo.ndim).tolist():
        dst = tuple(phase_of_t[i][t[i]] for i in range(geo.ndim)) + tuple(
            tap_of_t[i][t[i]] for i in range(geo.ndim))
        kernel[(slice(None), slice(None), slice(None)) + dst] = w[(slice(None), slice(None), slice(None)) + tuple(t)]
    kernel = kernel.reshape((geo.groups, o_g, c_g * phases) + tuple(taps))
    return Polyphase(kernel=kernel, grid=tuple(grid))


def _freq_chunks(poly: Polyphase, per_freq_bytes: int) -> int:
    return max(1, int(CHUNK_BYTES // max(per_freq_bytes, 1)))


def _dft_phases(n: int, taps: int, freqs: torch.Tensor) -> torch.Tensor:
    """exp(-2 pi i m a / n) for frequencies ``m`` and taps ``a``, reducing m*a mod n in integers."""
    prod = (freqs[:, None].long() * torch.arange(taps)[None, :]) % n
    angle = (-2.0 * math.pi / n) * prod.to(torch.float64)
    return torch.polar(torch.ones_like(angle), angle)


def _symbols_fft(poly: Polyphase, chunk: int) -> Iterator[torch.Tensor]:
    """Khat(w) over half the grid, in chunks of frequencies: (n, groups, O_g, Cin) complex128.

    An FFT over all spatial dims but the first (rfft on the last), then the first dim one
    frequency row at a time as a short sum over its few taps, so the full symbol (which can be
    gigabytes for 512 channels) never sits in memory at once.
    """
    k = poly.kernel
    nd = len(poly.grid)
    if nd == 1:
        sym = torch.fft.rfft(k, n=poly.grid[0], dim=3).movedim(3, 0)
        for start in range(0, sym.shape[0], chunk):
            yield sym[start:start + chunk]
        return
    tail = torch.fft.rfftn(k, s=poly.grid[1:], dim=tuple(range(4, 3 + nd)))  # (g,O,C,A0,rest...)
    phase = _dft_phases(poly.grid[0], k.shape[3], torch.arange(poly.grid[0])).to(k.device)
    buf: list[torch.Tensor] = []
    size = 0
    for row in range(poly.grid[0]):
        slab = torch.einsum("a,goca...->...goc", phase[row], tail)
        slab = slab.reshape((-1,) + slab.shape[-3:])
        buf.append(slab)
        size += slab.shape[0]
        if size >= chunk or row == poly.grid[0] - 1:
            yield torch.cat(buf)
            buf, size = [], 0


def _symbols_direct(poly: Polyphase, chunk: int) -> Iterator[torch.Tensor]:
    """Khat(w) over the same half grid by a direct DFT sum over the taps (no FFT): for checking."""
    k = poly.kernel
    nd = len(poly.grid)
    taps = k.shape[3:]
    axes = [torch.arange(n) for n in poly.grid[:-1]] + [torch.arange(poly.grid[-1] // 2 + 1)]
    freqs = torch.cartesian_prod(*axes).reshape(-1, nd)
    flat = k.to(torch.complex128)
    for start in range(0, freqs.shape[0], chunk):
        f = freqs[start:start + chunk]
        sym = flat
        # contract one spatial dim at a time: (g,O,C,a_0..a_{d-1}) -> (n, g, O, C)
        ph = [_dft_phases(poly.grid[i], taps[i], f[:, i]).to(k.device) for i in range(nd)]
        sym = torch.einsum("fa,goca...->fgoc...", ph[0], sym)
        for i in range(1, nd):
            sym = torch.einsum("fa,fgoca...->fgoc...", ph[i], sym)
        yield sym


# --------------------------------------------------------------------------------------------
# Gram iteration, batched over frequencies
# --------------------------------------------------------------------------------------------


def _gram_bounds(sym: torch.Tensor, floor: float, tol: float = GRAM_TOL,
                 max_iters: int = GRAM_MAX_ITERS) -> tuple[torch.Tensor, float]:
    """Guaranteed upper bounds on sigma_max of each matrix in ``sym`` (batch, m, n) complex128.

    Returns (bounds per matrix, best lower estimate seen). ``floor`` is a known lower bound on
    the max over all matrices (used only to stop early; any value is sound).

    Products run in real arithmetic: for G = X + iY, G^H G = X^T X + Y^T Y + i(X^T Y - Y^T X);
    once G is Hermitian (X symmetric, Y antisymmetric), G^2 = X^2 - Y^2 + i(XY - (XY)^T).
    """
    batch = sym.shape[0]
    if sym.shape[1] < sym.shape[2]:
        sym = sym.mH  # orient so that G^H G has the smaller side
    kx, ky = sym.real.contiguous(), sym.imag.contiguous()
    bounds = torch.empty(batch, dtype=torch.float64, device=sym.device)
    lower = float(floor)
    active = torch.arange(batch, device=sym.device)
    x, y = kx, ky
    log_scale = torch.zeros(batch, dtype=torch.float64, device=sym.device)
    for t in range(max_iters + 1):
        fro = torch.sqrt((x * x).sum(dim=(1, 2)) + (y * y).sum(dim=(1, 2)))
        zero = fro == 0
        fro = torch.where(zero, torch.ones_like(fro), fro)
        log_bound = (log_scale + torch.log(fro)) / 2.0 ** t
        bound = torch.where(zero, torch.zeros_like(fro), torch.exp(log_bound))
        if t >= 1:
            # Rayleigh lower estimate: the heaviest column of the Gram power approximates the top
            # right singular vector of K at this frequency.
            col = ((x * x).sum(dim=1) + (y * y).sum(dim=1)).argmax(dim=1)
            idx = col[:, None, None].expand(-1, x.shape[1], 1)
            vx, vy = x.gather(2, idx), y.gather(2, idx)
            ax, ay = kx[active], ky[active]
            kvx, kvy = ax @ vx - ay @ vy, ax @ vy + ay @ vx
            num = (kvx * kvx + kvy * kvy).sum(dim=(1, 2))
            den = (vx * vx + vy * vy).sum(dim=(1, 2))
            est = torch.sqrt(num / torch.where(den > 0, den, torch.ones_like(den)))
            lower = max(lower, float(est.max()))
        done = (bound <= lower * (1.0 + tol)) | zero
        if t == max_iters:
            done = torch.ones_like(done)
        bounds[active[done]] = bound[done]
        keep = ~done
        if not bool(keep.any()):
            break
        active, x, y, fro = active[keep], x[keep], y[keep], fro[keep]
        log_scale = 2.0 * (log_scale[keep] + torch.log(fro))
        x = x / fro[:, None, None]
        y = y / fro[:, None, None]
        if t == 0:
            xt, yt = x.mT, y.mT
            x, y = xt @ x + yt @ y, xt @ y - yt @ x
        else:
            xy = x @ y
            x, y = x @ x - y @ y, xy - xy.mT
    return bounds, lower


def _fft_bound(poly: Polyphase, floor: float) -> tuple[float, float]:
    """(max over frequencies of the Gram bound, best lower estimate)."""
    per_freq = poly.groups * (poly.rows * poly.cols * 16 * 3 + min(poly.rows, poly.cols) ** 2 * 8 * 6)
    chunk = _freq_chunks(poly, per_freq)
    best, lower = 0.0, float(floor)
    for sym in _symbols_fft(poly, chunk):
        b, lower = _gram_bounds(sym.reshape((-1,) + sym.shape[-2:]), lower)
        best = max(best, float(b.max()))
    return best, lower


def _fft_dim(geo: ConvGeometry, poly: Polyphase) -> int:
    """Problem size used for the rounding margin of the FFT/Gram bound.

    The bound's rounding error comes from a length-prod(N) FFT of each kernel entry and
    matmuls of inner dimension <= C*prod(s); ``prod(N) * C*prod(s)`` (at least the unrolled size)
    dominates both error terms generously.
    """
    return max(geo.n_in, geo.n_out, math.prod(poly.grid) * poly.cols)


def _upper(geo: ConvGeometry, poly: Polyphase, floor: float) -> tuple[float, str]:
    bound, _ = _fft_bound(poly, floor)
    grid = "x".join(str(n) for n in poly.grid)
    extra = f", polyphase s={'x'.join(map(str, geo.stride))}" if math.prod(geo.stride) > 1 else ""
    return bound, f"FFT symbol + Gram iteration (grid {grid}{extra})"


def conv_norm_upper(weight, in_shape, stride, pads, dilation, groups, device="cpu",
                    lower_hint: float = 0.0) -> tuple[float, str]:
    """Guaranteed upper bound on ||conv||_2 (not inflated) and the method's name.

    ``lower_hint`` (optional) is any known lower estimate of the norm; it only lets the Gram
    iteration stop earlier at frequencies that cannot be the maximum.
    """
    geo = conv_geometry(weight, in_shape, stride, pads, dilation, groups)
    return _upper(geo, polyphase(weight, geo, device), lower_hint)


# --------------------------------------------------------------------------------------------
# Lower estimate
# --------------------------------------------------------------------------------------------


def conv_power_iteration(weight, in_shape, stride, pads, dilation, groups, iters=50, seed=0,
                         device="cpu") -> float:
    """Lower estimate ||A v|| / ||v|| after ``iters`` steps of power iteration on A^T A (float64).

    It runs on the true operator (not the circulant), so it never exceeds the true norm beyond
    float64 rounding.
    """
    geo = conv_geometry(weight, in_shape, stride, pads, dilation, groups)
    w = weight.detach().to(device=device, dtype=torch.float64)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    v = torch.randn((1,) + tuple(in_shape), generator=gen, dtype=torch.float64).to(device)
    args = (geo.stride, geo.begin + geo.end, geo.dilation, geo.groups)
    for _ in range(iters):
        v = conv_adjoint(conv_apply(v, w, *args), w, in_shape, *args)
        n = torch.linalg.vector_norm(v)
        if n == 0:
            return 0.0
        v = v / n
    return float(torch.linalg.vector_norm(conv_apply(v, w, *args)) / torch.linalg.vector_norm(v))


# --------------------------------------------------------------------------------------------
# Public entry point and independent check
# --------------------------------------------------------------------------------------------


def conv_norm(weight, in_shape, stride, pads, dilation, groups, device="cpu",
              exact_max_entries=4_000_000) -> NormResult:
    """Certified ||conv||_2: exact unrolled SVD when small, else the FFT/Gram bound (both inflated)."""
    geo = conv_geometry(weight, in_shape, stride, pads, dilation, groups)
    if geo.n_in * geo.n_out <= exact_max_entries:
        dim = max(geo.n_in, geo.n_out)
        sigma = conv_norm_exact(weight, in_shape, stride, pads, dilation, groups, device)
        return NormResult(upper=inflate(sigma, dim), lower=sigma * (1.0 - relative_margin(dim)),
                          method="exact SVD (unrolled)")
    lower = conv_power_iteration(weight, in_shape, stride, pads, dilation, groups, device=device)
    poly = polyphase(weight, geo, device)
    bound, method = _upper(geo, poly, lower)
    return NormResult(upper=inflate(bound, _fft_dim(geo, poly)), lower=lower, method=method)


def verify_conv_bound(weight, in_shape, stride, pads, dilation, groups, upper) -> bool:
    """The trusted check (``lipverify.verifier.conv``) that ``upper`` >= ||conv||_2."""
    from lipverify.verifier.conv import conv_norm_at_most

    geo = conv_geometry(weight, in_shape, stride, pads, dilation, groups)
    w = weight.detach().to(torch.float64)
    pads = tuple(geo.begin) + tuple(geo.end)
    return conv_norm_at_most(w, tuple(in_shape), geo.stride, pads, geo.dilation, geo.groups, upper,
                             apply=lambda x: conv_apply(x, w, geo.stride, pads, geo.dilation, geo.groups))
