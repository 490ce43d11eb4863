"""Progress renderers for the CLI (see ``lipverify.progress`` for the interface).

``BarProgress``: rich bars and spinners on a terminal (transient: they vanish when done).
``LineProgress``: when stderr is not a terminal (CI logs), a short line when a stage starts and
one when it ends with its duration, and for a long loop a line now and then with the count done,
so a log shows where the time goes. Stages and loops inside a loop print their lines during the loop's
first step only (what one step does and how long it takes), then nothing: one bound per class pair
would otherwise print its own stages 45 times, and the loop's own lines count the steps. Both only display: the clock read here decides nothing.
"""

from __future__ import annotations

import contextlib
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, SpinnerColumn, TextColumn, \
    TimeElapsedColumn

from lipverify.progress import Progress

PREFIX = "lipverify:"
LINE_EVERY_S = 15.0  # a long loop prints its count at most this often in LineProgress


class BarProgress(Progress):
    def __init__(self, console: Console):
        self.bars = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 console=console, transient=True)
        self.active: list = []  # innermost last

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        self.bars.__exit__(*exc)

    def track(self, iterable, description, total=None):
        task = self.bars.add_task(description, total=total, info="")
        self.active.append(task)
        try:
            for item in iterable:
                yield item
                self.bars.advance(task)
        finally:
            self.active.remove(task)
            self.bars.remove_task(task)

    @contextlib.contextmanager
    def stage(self, name):
        task = self.bars.add_task(name, total=None, info="")
        self.active.append(task)
        try:
            yield
        finally:
            self.active.remove(task)
            self.bars.remove_task(task)

    def status(self, text):
        if self.active:
            self.bars.update(self.active[-1], info=text)


class LineProgress(Progress):
    def __init__(self, console: Console):
        self.console = console
        self._status = ""
        self._past_first = 0  # running loops past their first step: what is nested in them is silent

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def _line(self, text: str) -> None:
        self.console.print(f"{PREFIX} {text}", highlight=False, markup=False, soft_wrap=True)

    def track(self, iterable, description, total=None):
        if self._past_first:
            yield from iterable
            return
        of = f"/{total}" if total is not None else ""
        self._line(f"{description}: started" + (f" ({total} steps)" if total is not None else ""))
        start = last = time.perf_counter()
        done = 0
        try:
            for item in iterable:
                yield item
                done += 1
                if done == 1:
                    self._past_first += 1
                now = time.perf_counter()
                if now - last >= LINE_EVERY_S:
                    last = now
                    self._line(f"{description}: {done}{of} ({now - start:.0f} s){self._detail()}")
        finally:  # also when the loop stops early
            self._past_first -= done > 0
            self._line(f"{description}: {done}{of} done in {time.perf_counter() - start:.1f} s{self._detail()}")

    @contextlib.contextmanager
    def stage(self, name):
        if self._past_first:
            yield
            return
        self._line(f"{name} ...")
        start = time.perf_counter()
        self._status = ""
        try:
            yield
        except BaseException:
            self._line(f"{name}: stopped after {time.perf_counter() - start:.1f} s")
            raise
        self._line(f"{name}: done in {time.perf_counter() - start:.1f} s{self._detail()}")

    def status(self, text):
        self._status = text

    def _detail(self) -> str:
        text, self._status = self._status, ""
        return f"; {text}" if text else ""


def make_progress(console: Console, quiet: bool) -> contextlib.AbstractContextManager:
    """The renderer for this run, as a context manager yielding a ``Progress``."""
    if quiet:
        return contextlib.nullcontext(Progress())
    return BarProgress(console) if console.is_terminal else LineProgress(console)
