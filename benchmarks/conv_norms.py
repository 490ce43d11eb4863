"""Per-layer time of the certified conv norm: exact unrolled SVD vs the FFT/Gram upper-bound path.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/conv_norms.py`` (about 1-2 minutes on 2 cores).

Layers are 3x3 convs with He-scaled random weights, laid out like ResNet-18 stages on 32x32
(CIFAR) and 56x56 (ImageNet after the stem) inputs, plus a few small layers where the exact SVD
still fits (the unrolled matrix of a 64-channel 32x32 layer alone would need 34 GB).
"exact" = unroll + LAPACK SVD in float64; "bound" = ``conv_norm(..., exact_max_entries=0)``:
power iteration (lower) + FFT symbol + Gram iteration (certified upper, inflated).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lipverify.norms.conv import conv_geometry, conv_norm, conv_norm_exact  # noqa: E402

torch.set_num_threads(1)
EXACT_MAX_ENTRIES = 8_500_000  # ~68 MB unrolled, a few seconds of SVD

# (name, C_in, C_out, spatial, stride)
LAYERS = [
    ("small", 16, 16, 8, 1),
    ("small", 32, 32, 8, 1),
    ("small", 16, 32, 16, 2),
    ("small", 8, 8, 24, 1),
    ("cifar32", 64, 64, 32, 1),
    ("cifar32", 64, 128, 32, 2),
    ("cifar32", 128, 128, 16, 1),
    ("cifar32", 256, 256, 8, 1),
    ("cifar32", 256, 512, 8, 2),
    ("cifar32", 512, 512, 4, 1),
    ("imnet56", 64, 64, 56, 1),
    ("imnet56", 64, 128, 56, 2),
    ("imnet56", 128, 128, 28, 1),
    ("imnet56", 256, 256, 14, 1),
    ("imnet56", 512, 512, 7, 1),
]


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    header = (f"{'stack':8} {'layer':>16} {'input':>12} {'entries':>9} {'exact s':>8} {'bound s':>8} "
              f"{'ratio':>7} {'exact':>9} {'upper':>9} {'lower':>9} {'up/low':>7} {'up/exact':>8}")
    print(header)
    print("-" * len(header))
    total = time.perf_counter()
    for name, c_in, c_out, n, stride in LAYERS:
        w = torch.randn(c_out, c_in, 3, 3, generator=gen, dtype=torch.float64) * math.sqrt(2.0 / (9 * c_in))
        shape, pads = (c_in, n, n), (1, 1, 1, 1)
        geo = conv_geometry(w, shape, stride, pads, 1, 1)
        entries = geo.n_in * geo.n_out
        t = time.perf_counter()
        res = conv_norm(w, shape, stride, pads, 1, 1, exact_max_entries=0)
        t_bound = time.perf_counter() - t
        if entries <= EXACT_MAX_ENTRIES:
            t = time.perf_counter()
            exact = conv_norm_exact(w, shape, stride, pads, 1, 1)
            t_exact = time.perf_counter() - t
            ex_s, ratio, ex_v, tight = (f"{t_exact:8.2f}", f"{t_exact / t_bound:7.2f}", f"{exact:9.4f}",
                                        f"{res.upper / exact:8.5f}")
        else:
            ex_s, ratio, ex_v, tight = f"{'skipped':>8}", f"{'-':>7}", f"{'skipped':>9}", f"{'-':>8}"
        layer = f"{c_in}->{c_out} s{stride}"
        print(f"{name:8} {layer:>16} {str(n) + 'x' + str(n):>12} {entries:9.2e} {ex_s} {t_bound:8.2f} "
              f"{ratio} {ex_v} {res.upper:9.4f} {res.lower:9.4f} {res.gap:7.4f} {tight}", flush=True)
    print(f"total {time.perf_counter() - total:.1f} s; ratio = exact time / bound time; "
          f"up/low = certified upper / power-iteration lower")


if __name__ == "__main__":
    main()
