"""Progress renderers: they show, they never change what the loop does."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from lipverify.progress import Progress, as_progress
from lipverify.report.progress import BarProgress, LineProgress, make_progress


def _exercise(progress) -> list[int]:
    seen = []
    with progress.stage("outer stage"):
        for i in progress.track(range(5), "a loop", 5):
            progress.status(f"item {i}")
            seen.append(i)
        for i in progress(range(10), "stops early", 10):  # the plain-callable form
            if i == 2:
                break
    return seen


def test_bars_on_a_terminal():
    buf = io.StringIO()
    with BarProgress(Console(file=buf, force_terminal=True, width=100)) as progress:
        assert _exercise(progress) == [0, 1, 2, 3, 4]
        assert progress.active == [] and len(progress.bars.tasks) == 0  # finished bars are removed


def test_lines_without_a_terminal():
    buf = io.StringIO()
    with LineProgress(Console(file=buf, width=40)) as progress:
        assert _exercise(progress) == [0, 1, 2, 3, 4]
        with pytest.raises(ValueError), progress.stage("failing stage"):
            raise ValueError("boom")
    lines = buf.getvalue().splitlines()
    assert lines[0] == "lipverify: outer stage ..."
    assert any(l.startswith("lipverify: a loop: 5/5 done in ") and l.endswith("; item 4") for l in lines)
    assert any(l.startswith("lipverify: stops early: 2/10 done in ") for l in lines)  # early stop still ends
    assert any(l.startswith("lipverify: outer stage: done in ") for l in lines)
    assert any(l.startswith("lipverify: failing stage: stopped after ") for l in lines)
    # lines longer than the 40-column console are not wrapped: every line is a whole message
    assert max(len(l) for l in lines) > 40 and all(l.startswith("lipverify: ") for l in lines)


def test_silent_and_wrapped_callables():
    assert _exercise(Progress()) == [0, 1, 2, 3, 4]
    calls = []
    wrapped = as_progress(lambda it, desc, total=None: calls.append(desc) or it)
    assert _exercise(wrapped) == [0, 1, 2, 3, 4] and calls == ["a loop", "stops early"]
    with make_progress(Console(file=io.StringIO()), quiet=True) as quiet:
        assert type(quiet) is Progress
