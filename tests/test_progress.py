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


def test_what_is_nested_in_a_loop_prints_during_its_first_step_only():
    buf = io.StringIO()
    with LineProgress(Console(file=buf, width=200)) as progress:
        steps = []
        for pair in progress.track(range(45), "pairwise bounds", 45):
            with progress.stage("bound: layerwise"):
                for k in progress.track(range(3), "per-layer norms", 3):
                    steps.append((pair, k))
        for _ in progress.track(range(2), "after", 2):  # the next loop prints again
            with progress.stage("inside after"):
                pass
    assert len(steps) == 135  # nothing nested is skipped, only its lines
    lines = buf.getvalue().splitlines()
    assert sum("per-layer norms: started" in l for l in lines) == 1
    assert sum(l.startswith("lipverify: bound: layerwise: done in") for l in lines) == 1
    assert lines[0] == "lipverify: pairwise bounds: started (45 steps)"
    assert any(l.startswith("lipverify: pairwise bounds: 45/45 done in ") for l in lines)
    assert sum(l == "lipverify: inside after ..." for l in lines) == 1
    assert lines[-1].startswith("lipverify: after: 2/2 done in ")
