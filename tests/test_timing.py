"""Results are a function of the inputs and options, never of how busy the machine is.

The clock is slowed down (every read advances it by 1000 s): a stage that stops, or a method that
is dropped, when time runs out would certify differently. Only an explicit --budget-s may cut work,
and then the certificate lists what it cut.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import FIXTURES, export_onnx
from lipverify.certify import CertifyOptions, certify
from lipverify.timebudget import TimeBudget

QUICK = dict(lower_starts=2, lower_effort=0.25)  # a small, deterministic lower-bound search


@pytest.fixture
def slow_clock(monkeypatch):
    state = {"t": time.perf_counter()}

    def crawl():
        state["t"] += 1000.0
        return state["t"]

    def use():
        monkeypatch.setattr(time, "perf_counter", crawl)

    return use


@pytest.fixture(scope="module")
def four_class_model(tmp_path_factory):
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))
    d = tmp_path_factory.mktemp("t")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = m(torch.from_numpy(x)).argmax(1).numpy()  # labels the model gets right: radii are positive
    np.savez(d / "d.npz", x=x, y=y)
    return export_onnx(m, (6,), d / "m.onnx"), d / "d.npz"


def _certified(cert: dict) -> dict:
    return {"method": cert["method"], "why": cert["method_reason"], "bounds": cert["bounds"],
            "layers": [(l["name"], l["factor"]) for l in cert["layers"]]}


def test_method_choice_and_bounds_do_not_depend_on_the_clock(four_class_model, slow_clock):
    model, _ = four_class_model
    opts = lambda: CertifyOptions(**QUICK, method_options={"layerwise_steps": 40})  # noqa: E731
    normal = certify(model, opts())
    slow_clock()
    slow = certify(model, opts())
    assert set(normal["bounds"]) == {"product", "lipsdp-neuron", "layerwise"}  # lipsdp-layer: dominated
    assert _certified(slow) == _certified(normal)
    assert slow["run"]["cut_by_budget"] == [] and normal["run"]["cut_by_budget"] == []
    assert any("(40 Adam steps" in n for n in slow["notes"])  # the full step count ran


def _with_data(data_path, **kw):
    from lipverify.data import DataSpec
    from lipverify.robustness import DataOptions

    return CertifyOptions(**QUICK, data=DataOptions(spec=DataSpec(path=str(data_path)), eps=[0.01, 0.05]), **kw)


def test_pairwise_radii_do_not_depend_on_the_clock(four_class_model, slow_clock):
    model, data = four_class_model
    normal = certify(model, _with_data(data))
    slow_clock()
    slow = certify(model, _with_data(data))
    assert slow["data"]["pairwise_methods"] == normal["data"]["pairwise_methods"]
    assert slow["data"]["L_pairwise"] == normal["data"]["L_pairwise"]
    assert slow["data"]["certified_accuracy"] == normal["data"]["certified_accuracy"]


def test_budget_cuts_are_listed(four_class_model, slow_clock):
    model, data = four_class_model
    slow_clock()  # the first clock read after the start already spends any budget
    cert = certify(model, _with_data(data, budget_s=5.0))
    cuts = cert["run"]["cut_by_budget"]
    assert cert["run"]["budget_s"] == 5.0
    assert list(cert["bounds"]) == ["product"]  # the first method always runs
    for name in ("lipsdp-neuron", "layerwise"):
        assert f"{name}: not run (--budget-s spent before it started)" in cuts
    assert any(c.startswith("sampled lower bound: what was left of --budget-s") for c in cuts)
    assert cert["data"]["pairwise_methods"] == {"product": 6}


def test_layerwise_budget_cut_names_the_steps(slow_clock):
    from lipverify.bounds import METHODS, BoundContext
    from lipverify.certify import build_graph
    from lipverify.load import load_model

    graph, _ = build_graph(load_model(FIXTURES / "resmlp.onnx"))
    slow_clock()
    budget = TimeBudget(1500.0)  # spent at the second clock read, inside the optimisation
    result = METHODS["layerwise"].run(graph, BoundContext(time_budget=budget, options={"layerwise_steps": 50}))
    assert len(budget.cuts) == 1 and "layerwise: Adam on the scalings stopped after" in budget.cuts[0]
    assert "of 50 steps (--budget-s)" in budget.cuts[0]
    steps = int(budget.cuts[0].split("stopped after ")[1].split(" ")[0])
    assert steps < 50 and any(f"({steps} Adam steps" in n for n in result.notes)


def test_time_budget_counts_repeated_cuts():
    ticks = iter(range(100))
    budget = TimeBudget(3.0, clock=lambda: float(next(ticks)))  # starts at 0; each read is 1 s later
    assert not budget.expired("x") and budget.left() == 1.0
    assert budget.expired("pair solver stopped") and budget.expired("pair solver stopped")
    assert budget.cuts == ["pair solver stopped (x2)"]
    assert TimeBudget().left() is None and not TimeBudget().expired("never")
