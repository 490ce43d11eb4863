"""How long-running stages report progress, independently of how it is shown.

The pipeline and the bound methods call three things: ``track(iterable, description, total)``
around a loop (pairs, steps, batches), ``stage(name)`` around a stage without a natural loop
(loading, one solver run), and ``status(text)`` for a live detail of the innermost loop (a
current estimate). This base class shows nothing (library use); the CLI passes a renderer from
``lipverify.report.progress`` (bars on a terminal, one line per stage otherwise). Progress only
displays: nothing here decides anything.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


class Progress:
    def track(self, iterable: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
        return iterable

    def __call__(self, iterable: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
        # the plain-callable form that BoundContext.track and older callers use
        return self.track(iterable, description, total)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        yield

    def status(self, text: str) -> None:
        """A live detail of the innermost running loop or stage."""


class _CallableProgress(Progress):
    """A bare ``track(iterable, description, total)`` function given by a library caller."""

    def __init__(self, track: Callable):
        self._track = track

    def track(self, iterable, description, total=None):
        return self._track(iterable, description, total)


def as_progress(track) -> Progress:
    if track is None:
        return Progress()
    if isinstance(track, Progress):
        return track
    return _CallableProgress(track)
