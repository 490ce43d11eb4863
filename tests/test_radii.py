"""Certified radii: known answers, the never-certify rules, CSV round trips, and an attack check."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lipverify.errors import UserInputError
from lipverify.radii import accuracy_curve, compute_radii, pgd_inside_radius, read_csv, summarize, write_csv

torch.set_num_threads(1)


def test_hand_computed_global_radius():
    r = compute_radii(np.array([[3.0, 1.0, 0.0]]), np.array([0]), 2.0, None, [0.5, 0.7, 0.75])
    expected = 2.0 / (math.sqrt(2.0) * 2.0)  # margin 2, L 2
    assert r.margin[0] == 2.0
    assert r.radius[0] <= expected and r.radius[0] == pytest.approx(expected, rel=1e-14)
    assert r.radius_pairwise is None and r.form == "global"
    assert [bool(r.certified_at[e][0]) for e in (0.5, 0.7, 0.75)] == [True, True, False]


def test_hand_computed_pairwise_radius():
    P = np.array([[0.0, 1.0, 4.0], [1.0, 0.0, 2.0], [4.0, 2.0, 0.0]])
    r = compute_radii(np.array([[3.0, 1.0, 0.0]]), np.array([0]), 2.0, P, [])
    # min(f0 - f1 over L01, f0 - f2 over L02) = min(2/1, 3/4)
    assert r.radius_pairwise[0] == pytest.approx(0.75, rel=1e-14) and r.radius_pairwise[0] <= 0.75
    assert r.radius[0] == r.radius_pairwise[0]  # better than the global 0.7071
    assert r.form == "pairwise"


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), c=st.integers(2, 8))
def test_pairwise_never_worse_when_its_bounds_are(seed, c):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(30, c)) * 3
    y = rng.integers(0, c, size=30)
    L = float(rng.uniform(0.5, 5))
    P = rng.uniform(0.1, 1.0, size=(c, c)) * math.sqrt(2) * L
    P = np.minimum(P, P.T)
    r = compute_radii(f, y, L, P, [0.1])
    assert (r.radius_pairwise >= r.radius_global).all()
    assert (r.radius == np.maximum(r.radius_global, r.radius_pairwise)).all()
    # with L_yj = sqrt(2) L exactly the two forms agree
    r2 = compute_radii(f, y, L, np.full((c, c), math.sqrt(2) * L), [0.1])
    np.testing.assert_allclose(r2.radius_pairwise, r2.radius_global, rtol=1e-12)


def test_ties_and_misclassified_are_never_certified():
    f = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [2.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    y = np.array([0, 0, 0, 2])
    P = np.ones((3, 3))
    r = compute_radii(f, y, 1.0, P, [0.0, 0.1])
    assert r.radius.tolist()[:2] == [0.0, 0.0] and r.radius[3] == 0.0
    assert r.radius_global[[0, 1, 3]].tolist() == [0, 0, 0] and r.radius_pairwise[[0, 1, 3]].tolist() == [0, 0, 0]
    assert r.certified_at[0.0].tolist() == [False, False, True, False]
    s = summarize(r, [0.0, 0.1])
    assert (s["n_ties"], s["n_misclassified"], s["n"]) == (2, 1, 4)
    assert s["clean_accuracy"] == 0.25
    assert s["certified_accuracy"]["0.0"] == s["clean_accuracy"]


def test_certified_is_strict_at_the_radius():
    r = compute_radii(np.array([[1.0, 0.0]]), np.array([0]), 1.0, None, [])
    rad = float(r.radius[0])
    r2 = compute_radii(np.array([[1.0, 0.0]]), np.array([0]), 1.0, None, [rad, rad / 2])
    assert not r2.certified_at[rad][0] and r2.certified_at[rad / 2][0]


def test_logit_tolerance_shrinks_the_radius():
    f = np.array([[3.0, 1.0]])
    base = compute_radii(f, np.array([0]), 1.0, None, []).radius[0]
    tol = compute_radii(f, np.array([0]), 1.0, None, [], logit_tol=0.5).radius[0]
    assert tol == pytest.approx(base / 2, rel=1e-14)


def test_input_validation():
    f = np.zeros((2, 3))
    with pytest.raises(UserInputError, match="positive"):
        compute_radii(f, np.array([0, 1]), 0.0, None, [])
    with pytest.raises(UserInputError, match="0..2"):
        compute_radii(f, np.array([0, 3]), 1.0, None, [])
    with pytest.raises(UserInputError, match="at least 2 logits"):
        compute_radii(np.zeros((2, 1)), np.array([0, 0]), 1.0, None, [])
    with pytest.raises(UserInputError, match=r"\[3, 3\]"):
        compute_radii(f, np.array([0, 1]), 1.0, np.ones((2, 2)), [])
    with pytest.raises(UserInputError, match="NaN"):
        compute_radii(np.array([[np.nan, 0.0]]), np.array([0]), 1.0, None, [])
    with pytest.raises(UserInputError, match="eps"):
        compute_radii(f, np.array([0, 1]), 1.0, None, [-0.1])


def test_summary_and_curve():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(500, 4))
    y = rng.integers(0, 4, size=500)
    eps = [0.05, 0.2]
    r = compute_radii(f, y, 1.5, None, eps)
    s = summarize(r, eps)
    assert s["n"] == 500 and s["form"] == "global"
    assert s["certified_accuracy"]["0.05"] == pytest.approx(float((r.radius > 0.05).mean()))
    assert s["n_ties"] + s["n_misclassified"] + round(s["clean_accuracy"] * 500) == 500
    q = s["radius_quantiles"]
    assert q["q10"] <= q["q25"] <= q["median"] <= q["q75"] <= q["q90"]
    assert q["median"] in r.radius  # an actual sample's radius
    curve = s["curve"]
    acc = np.array(curve["certified_accuracy"])
    assert curve["radius"][0] == 0.0 and acc[0] == s["clean_accuracy"]
    assert (np.diff(acc) <= 0).all() and acc[-1] == 0.0
    for t, a in zip(curve["radius"], acc):  # every point is exact
        assert a == float((r.radius > t).mean())
    thin = accuracy_curve(r.radius, max_points=20)
    assert len(thin["radius"]) <= 20 and thin["radius"][-1] == curve["radius"][-1]
    import json

    json.dumps(s)  # JSON-ready


def test_csv_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    f = rng.normal(size=(40, 5)) * 1e3
    y = rng.integers(0, 5, size=40)
    P = rng.uniform(1, 3, size=(5, 5))
    eps = [0.001, 0.1]
    for pair in (P, None):
        r = compute_radii(f, y, 2.0 / 3.0, pair, eps, index=np.arange(100, 140))
        out = tmp_path / "radii.csv"
        out.write_text("old content")
        write_csv(r, eps, out)
        cols = read_csv(out)
        assert list(cols) == ["index", "label", "prediction", "margin", "radius", "radius_global",
                              "radius_pairwise", "certified@0.001", "certified@0.1"]
        np.testing.assert_array_equal(cols["index"], np.arange(100, 140))
        np.testing.assert_array_equal(cols["label"], r.label)
        np.testing.assert_array_equal(cols["prediction"], r.prediction)
        for name in ("margin", "radius", "radius_global"):
            assert cols[name].tolist() == getattr(r, name).tolist()  # bit-exact
        if pair is None:
            assert np.isnan(cols["radius_pairwise"]).all()
        else:
            assert cols["radius_pairwise"].tolist() == r.radius_pairwise.tolist()
        for e in eps:
            np.testing.assert_array_equal(cols[f"certified@{e!r}"], r.certified_at[e])
        assert sorted(os.listdir(tmp_path)) == ["radii.csv"]  # no temp file left behind


def _linear_model(seed, c=5, d=12):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(c, d))
    b = rng.normal(size=c)
    x = rng.normal(size=(150, d))
    f = x @ W.T + b
    y = f.argmax(axis=1)
    Wt, bt = torch.from_numpy(W), torch.from_numpy(b)
    return W, x, y, f, (lambda z: z @ Wt.T + bt)


def test_pgd_cannot_break_a_certified_radius_but_breaks_beyond():
    W, x, y, f, fn = _linear_model(0)
    c = W.shape[0]
    L = float(np.linalg.norm(W, 2))  # exact Lipschitz constant of the logit map
    P = np.array([[np.linalg.norm(W[i] - W[j]) for j in range(c)] for i in range(c)])  # exact pairwise
    r = compute_radii(f, y, L, P, [])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    assert not pgd_inside_radius(fn, xt, yt, r.radius_global).any()
    assert not pgd_inside_radius(fn, xt, yt, r.radius).any()
    # the pairwise radius of a linear model is exact: 5% beyond it an attack exists, and PGD finds it
    hit = pgd_inside_radius(fn, xt, yt, r.radius * 1.05)
    assert hit.mean() >= 0.9
    assert not pgd_inside_radius(fn, xt, yt, np.zeros(len(y))).any()  # radius 0: nothing to attack
    # an unsound formula (m / L, dropping the sqrt(2)) is caught by the attack on this model
    assert pgd_inside_radius(fn, xt, yt, r.radius_global * math.sqrt(2)).sum() >= 10


def test_pgd_on_a_relu_network_within_product_radius():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).double()
    L = float(np.prod([np.linalg.norm(m.weight.detach().numpy(), 2) for m in net if isinstance(m, torch.nn.Linear)]))
    x = torch.randn(100, 10, dtype=torch.float64)
    with torch.no_grad():
        f = net(x).numpy()
    y = f.argmax(axis=1)
    r = compute_radii(f, y, L, None, [])
    assert not pgd_inside_radius(net, x, torch.from_numpy(y), r.radius, steps=30).any()
    # far outside (10x the radius) the attack succeeds on many samples: it is a working attack
    assert pgd_inside_radius(net, x, torch.from_numpy(y), r.radius * 10, steps=30).mean() > 0.5
