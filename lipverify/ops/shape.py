"""Shape-only operations: they move entries around without changing their values.

Reshape/Flatten and Transpose are permutations (norm 1). Zero Pad embeds isometrically (norm 1).
Slice is a coordinate projection (norm ≤ 1; exactly 1 unless it selects nothing).
"""

from __future__ import annotations

import math

import torch.nn.functional as F

from lipverify.ops.base import LinearOp, NormResult, Op

_ONE = NormResult(upper=1.0, lower=1.0, method="exact (permutation/isometry)")


class Reshape(LinearOp):
    kind = "Reshape"

    def __init__(self, out_shape: tuple[int, ...]):
        self.out_shape = tuple(int(s) for s in out_shape)

    def apply(self, x):
        return x.reshape((x.shape[0],) + self.out_shape)

    def factor(self, in_shape, device="cpu"):
        return _ONE

    def describe(self):
        return f"Reshape →{self.out_shape}"


class Transpose(LinearOp):
    """Permutes per-sample axes (``perm`` excludes the batch axis)."""

    kind = "Transpose"

    def __init__(self, perm: tuple[int, ...]):
        self.perm = tuple(int(p) for p in perm)

    def apply(self, x):
        return x.permute((0,) + tuple(p + 1 for p in self.perm))

    def factor(self, in_shape, device="cpu"):
        return _ONE


class Pad(Op):
    """Constant padding; ``pads`` in torch F.pad order (last axis first). Affine with norm-1 linear part."""

    kind = "Pad"

    def __init__(self, torch_pads: tuple[int, ...], value: float = 0.0):
        self.torch_pads = tuple(int(p) for p in torch_pads)
        self.value = float(value)

    def magnitude(self, m, x):
        return F.pad(m, self.torch_pads, mode="constant", value=abs(self.value))

    def forward(self, x):
        if any(p < 0 for p in self.torch_pads):
            raise ValueError("negative pads are crops; handled as Slice")
        return F.pad(x, self.torch_pads, mode="constant", value=self.value)

    def factor(self, in_shape, device="cpu"):
        return _ONE


class Slice(LinearOp):
    """Selects a box of each sample: ``index`` is a tuple of per-sample slices."""

    kind = "Slice"

    def __init__(self, index: tuple[slice, ...]):
        self.index = index

    def apply(self, x):
        return x[(slice(None),) + self.index]

    def factor(self, in_shape, device="cpu"):
        # A coordinate projection: norm 1 (0 if empty, but 1 is still an upper bound).
        return NormResult(upper=1.0, lower=0.0, method="exact (projection)")


class Broadcast(LinearOp):
    """Copies each entry along the axes where the input has size 1 (ONNX Expand, or an elementwise op
    whose constant operand is larger than the input). Every input entry appears k = numel(out) /
    numel(in) times and the copies are disjoint, so the norm is exactly sqrt(k)."""

    kind = "Broadcast"

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = tuple(int(s) for s in out_shape)
        if len(self.in_shape) != len(self.out_shape) or any(
                i not in (1, o) for i, o in zip(self.in_shape, self.out_shape)):
            raise ValueError(f"cannot broadcast {self.in_shape} to {self.out_shape}")

    @property
    def copies(self) -> int:
        return math.prod(self.out_shape) // max(1, math.prod(self.in_shape))

    def apply(self, x):
        return x.expand((x.shape[0],) + self.out_shape)

    def factor(self, in_shape, device="cpu"):
        value = math.sqrt(self.copies)
        return NormResult(upper=value * (1 + 1e-15), lower=value, method=f"exact (sqrt of {self.copies} copies)")

    def describe(self):
        return f"Broadcast {self.in_shape}→{self.out_shape}"


class Tile(LinearOp):
    """ONNX Tile: the sample repeated ``repeats`` times per axis; norm sqrt(prod(repeats)) exactly."""

    kind = "Tile"

    def __init__(self, repeats: tuple[int, ...]):
        self.repeats = tuple(int(r) for r in repeats)

    def apply(self, x):
        return x.repeat((1,) + self.repeats)

    def factor(self, in_shape, device="cpu"):
        k = math.prod(self.repeats)
        return NormResult(upper=math.sqrt(k) * (1 + 1e-15), lower=math.sqrt(k), method=f"exact (sqrt of {k} copies)")

    def describe(self):
        return f"Tile {self.repeats}"
