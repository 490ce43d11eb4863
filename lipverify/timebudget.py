"""The run's one wall-clock budget (``--budget-s``), and the record of what it cut.

Without a budget nothing is ever cut by time: results depend on the inputs and options only.
With one, every stage that can stop early asks ``expired(what)``; the first time a stage is cut
the budget records ``what`` (a sentence naming the work left undone), and the certificate and
the terminal show the list. Identical sentences (one per class pair, say) are counted, not repeated.
"""

from __future__ import annotations

import time
from typing import Callable


class TimeBudget:
    def __init__(self, seconds: float | None = None, clock: Callable[[], float] | None = None):
        self.seconds = seconds
        self.clock = clock or (lambda: time.perf_counter())  # looked up per call (tests slow it down)
        self.start = self.clock()
        self._cuts: dict[str, int] = {}

    @property
    def limited(self) -> bool:
        return self.seconds is not None

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float | None:
        """Seconds left (never negative), or None without a budget."""
        if self.seconds is None:
            return None
        return max(self.seconds - self.elapsed(), 0.0)

    def expired(self, what: str | None = None) -> bool:
        """True once the budget is spent; ``what`` (the work this stops) is then recorded."""
        if self.seconds is None or self.elapsed() < self.seconds:
            return False
        if what:
            self.cut(what)
        return True

    def cut(self, what: str) -> None:
        self._cuts[what] = self._cuts.get(what, 0) + 1

    @property
    def cuts(self) -> list[str]:
        return [what if n == 1 else f"{what} (x{n})" for what, n in self._cuts.items()]
