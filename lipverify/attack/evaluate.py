"""Evaluating the user's file: the only function whose values are reported.

``FileModel`` wraps ``LoadedModel.reference`` (onnxruntime for ONNX, the original torch module
otherwise): numpy float32 in, outputs converted to float64 before any differencing. It always calls
the file with the same batch size (the last chunk is padded with copies of its last row), so a
kernel whose rounding depends on the batch size cannot make two runs differ. It counts evaluations
and applies the optional user time cap.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

EVAL_BATCH = 32  # samples per call of the file during the search


class BudgetExhausted(Exception):
    """The user's time cap (--lower-budget-s) ran out; the search stops where it is."""


class Budget:
    """The optional wall-clock cap given by the user. Without one, nothing here reads the clock's
    value for any decision: the work done is a function of the model and the options only."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.perf_counter()
        self.cut_at: str | None = None  # the stage that was cut, when the cap ran out

    def check(self, stage: str) -> None:
        if self.seconds is not None and time.perf_counter() - self.start > self.seconds:
            self.cut_at = self.cut_at or stage
            raise BudgetExhausted(stage)


class FileModel:
    """x (float64 or float32, shape (n, *input_shape)) -> the file's outputs, (n, m) float64."""

    def __init__(self, reference: Callable[[np.ndarray], np.ndarray], input_shape, output: int | None = None,
                 batch: int = EVAL_BATCH, budget: Budget | None = None):
        self.reference = reference
        self.input_shape = tuple(input_shape)
        self.output = output
        self.batch = batch
        self.budget = budget
        self.evaluations = 0

    def _call(self, x32: np.ndarray) -> np.ndarray:
        out = np.asarray(self.reference(x32), dtype=np.float64).reshape(len(x32), -1)
        return out if self.output is None else out[:, self.output:self.output + 1]

    def __call__(self, x: np.ndarray, stage: str = "search") -> np.ndarray:
        x32 = np.asarray(x, dtype=np.float32).reshape((-1,) + self.input_shape)
        outs = []
        for i in range(0, len(x32), self.batch):
            if self.budget is not None:
                self.budget.check(stage)
            chunk = x32[i:i + self.batch]
            pad = self.batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            outs.append(self._call(chunk)[: self.batch - pad])
            self.evaluations += len(chunk) - pad
        if not outs:
            return np.zeros((0, 1))
        return np.concatenate(outs)

    def single(self, x: np.ndarray) -> np.ndarray:
        """Outputs at batch size 1, one call per sample (how a pair is recomputed by anyone)."""
        x32 = np.asarray(x, dtype=np.float32).reshape((-1,) + self.input_shape)
        self.evaluations += len(x32)
        return np.concatenate([self._call(x32[i:i + 1]) for i in range(len(x32))])

    def together(self, x: np.ndarray) -> np.ndarray:
        """Outputs of all samples in one call (batch size len(x))."""
        x32 = np.asarray(x, dtype=np.float32).reshape((-1,) + self.input_shape)
        self.evaluations += len(x32)
        return self._call(x32)
