"""LipSDP-Neuron / -Layer on dense chains: known answers, verifier soundness, properties, loop form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lipverify.bounds.lipsdp_core import (lipsdp, lipsdp_batch, lmi_matrix, loop_jacobian, repair, rho_for_T,
                                          verify_lipsdp)

torch.set_num_threads(1)
EXT = Path(__file__).resolve().parents[2] / "shared" / "external"
GELU = (-0.12890414518615484, 1.128904145186155)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} absent")
    return path


def _rand_net(rng, dims, scale=1.0):
    return [rng.normal(size=(dims[i + 1], dims[i])) * scale / np.sqrt(dims[i]) for i in range(len(dims) - 1)]


# ----------------------------------------------------------------------------- known answers

@pytest.mark.parametrize("mode,expected", [("neuron", 36.482), ("layer", 39.839)])
def test_lipsdp_random_weights_known_answer(mode, expected):
    import scipy.io
    W = scipy.io.loadmat(_need(EXT / "LipSDP" / "random_weights.mat"))["weights"]
    ws = [W[0, i] for i in range(W.shape[1])]
    r = lipsdp(ws, (0, 1), mode)
    assert abs(r.value - expected) < 1e-3
    assert r.value >= r.raw_value - 1e-3 and r.mode == mode
    assert verify_lipsdp(ws, (0, 1), r.T, r.rho)[0]
    if mode == "layer":
        assert all(np.ptp(t) == 0 for t in r.T)


@pytest.mark.parametrize("slopes,expected", [((0, 1), 0.7372570), ((-0.13, 1.13), 0.8331004)])
def test_eclipse_known_answer_negative_alpha(slopes, expected):
    d = np.load(_need(EXT / "ECLipsE" / "lyr2n80test1.npz"))
    r = lipsdp([d["w1"], d["w2"]], slopes)
    assert abs(r.value - expected) < 2e-6
    # a tool printing 0.7373 for the GELU-like slope class is unsound
    if slopes[0] < 0:
        assert r.value > 0.833


GLIP = {("fnn2", 0): 5.10971, ("fnn2", 1): 5.22695, ("fnn2", 2): 5.02970, ("fnn2", 3): 5.57259,
        ("fnn2", 4): 5.20528, ("fnn3", 0): 9.72861, ("fnn3", 1): 9.79179, ("fnn3", 2): 8.92957,
        ("fnn3", 3): 7.75390, ("fnn3", 4): 8.70276}


@pytest.mark.parametrize("arch,seed", sorted(GLIP))
def test_glipsdp_fnn_logit7(arch, seed):
    import scipy.io
    d = scipy.io.loadmat(_need(EXT / "GLipSDP" / "Comparison" / "exports" / f"{arch}_seed{seed}_weights.mat"))
    names = sorted(k for k in d if k.startswith("fc") and k.endswith("_weight"))
    ws = [np.asarray(d[k], dtype=np.float64).T for k in names]  # stored transposed (in, out)
    ws[-1] = ws[-1][7:8]  # logit index 7 only
    r = lipsdp(ws, (0, 1))
    assert abs(r.value - GLIP[arch, seed]) <= 1e-4 * GLIP[arch, seed]


# ----------------------------------------------------------------------------- verifier soundness

def test_verifier_rejects_tampering_and_agrees_with_eigenvalues():
    rng = np.random.default_rng(3)
    ws = _rand_net(rng, [6, 9, 7, 3], 1.5)
    sl = [GELU, (0.1, 1.0)]
    r = lipsdp(ws, sl)
    assert verify_lipsdp(ws, sl, r.T, r.rho)[0]
    assert not verify_lipsdp(ws, sl, r.T, r.rho * (1 - 1e-5))[0]  # rho is (near) tight
    bad = [t.copy() for t in r.T]
    bad[0][np.argmax(bad[0])] *= 0.5
    assert not verify_lipsdp(ws, sl, bad, r.rho)[0]
    neg = [t.copy() for t in r.T]
    neg[1][0] = -1e-3
    assert not verify_lipsdp(ws, sl, neg, r.rho * 10)[0]  # T >= 0 is required by the S-procedure
    assert not verify_lipsdp(ws, sl, r.T, float("nan"))[0]
    assert not verify_lipsdp(ws, sl, r.T[:1], r.rho)[0]
    # sign agreement with a dense eigen-decomposition on random candidates
    for _ in range(30):
        T = [t * rng.uniform(0.5, 2.0, size=t.shape) for t in r.T]
        rho = r.rho * rng.uniform(0.5, 3.0)
        lam = np.linalg.eigvalsh(lmi_matrix(ws, sl, T, rho))[-1]
        ok = verify_lipsdp(ws, sl, T, rho)[0]
        if lam > 0:
            assert not ok
        if lam < -1e-6 * rho:
            assert ok


def test_repair_is_minimal_and_verified():
    rng = np.random.default_rng(4)
    ws = _rand_net(rng, [5, 8, 8, 2])
    T = [rng.uniform(0.5, 2.0, size=8) * 5, rng.uniform(0.5, 2.0, size=8) * 5]
    rho = repair(ws, (0, 1), T)
    if not np.isfinite(rho):
        pytest.skip("random T infeasible")
    assert verify_lipsdp(ws, (0, 1), T, rho)[0]
    assert abs(rho - rho_for_T(ws, (0, 1), T)) <= 1e-6 * rho
    lam = np.linalg.eigvalsh(lmi_matrix(ws, (0, 1), T, rho * (1 - 1e-6)))[-1]
    assert lam > 0  # slightly smaller rho is truly infeasible


# ----------------------------------------------------------------------------- properties

def _sampled_lower(ws, act, n=300, seed=0):
    """max ||J(x)||_2 over random inputs: a true lower bound on Lip(f)."""
    g = torch.Generator().manual_seed(seed)
    Wt = [torch.as_tensor(w) for w in ws]
    best = 0.0
    for _ in range(n):
        x = torch.randn(Wt[0].shape[1], generator=g, dtype=torch.float64) * 2

        def f(z):
            for W in Wt[:-1]:
                z = act(W @ z)
            return Wt[-1] @ z
        J = torch.autograd.functional.jacobian(f, x)
        best = max(best, float(torch.linalg.matrix_norm(J, 2)))
    return best


ACTS = [((0.0, 1.0), torch.relu), ((0.1, 1.0), lambda z: torch.nn.functional.leaky_relu(z, 0.1)),
        ((0.0, 1.0), torch.tanh), (GELU, torch.nn.functional.gelu)]


@pytest.mark.parametrize("case", range(4))
def test_properties_random_nets(case):
    rng = np.random.default_rng(10 + case)
    slopes, act = ACTS[case]
    depth = [1, 2, 3, 2][case]
    dims_ = [int(rng.integers(3, 10))] + [int(rng.integers(4, 14)) for _ in range(depth)] + [int(rng.integers(1, 4))]
    ws = _rand_net(rng, dims_, 2.0)
    neuron = lipsdp(ws, slopes, "neuron")
    layer = lipsdp(ws, slopes, "layer")
    K = max(abs(slopes[0]), abs(slopes[1]))
    product = np.prod([np.linalg.norm(w, 2) for w in ws]) * K ** depth
    lower = _sampled_lower(ws, act)
    assert lower <= neuron.value
    assert neuron.value <= layer.value * (1 + 1e-6)
    assert layer.value <= product * (1 + 1e-6)
    for r in (neuron, layer):
        assert verify_lipsdp(ws, slopes, r.T, r.rho)[0]
        assert r.value >= np.sqrt(r.rho)


def test_pairwise_difference_batch():
    rng = np.random.default_rng(7)
    ws = _rand_net(rng, [6, 12, 10, 4], 2.0)
    full = lipsdp(ws, (0, 1)).value
    rows = [(np.eye(4)[i] - np.eye(4)[j]) @ ws[-1] for i in range(4) for j in range(i + 1, 4)]
    res = lipsdp_batch(ws[:-1], (0, 1), rows)
    assert len(res) == 6
    for r, row in zip(res, rows):
        assert r.value <= np.sqrt(2) * full * (1 + 1e-6)
        assert verify_lipsdp(ws[:-1] + [row[None]], (0, 1), r.T, r.rho)[0]


def test_layer_time_budget_still_certified():
    rng = np.random.default_rng(8)
    ws = _rand_net(rng, [20, 30, 30, 30, 5], 2.0)
    r = lipsdp(ws, (0, 1), time_budget_s=0.0)  # stops after the first centering: weaker, still verified
    full = lipsdp(ws, (0, 1))
    assert verify_lipsdp(ws, (0, 1), r.T, r.rho)[0]
    assert r.value >= full.value * (1 - 1e-9)


def test_bad_inputs():
    with pytest.raises(ValueError):
        lipsdp([np.ones((3, 2))], (0, 1))
    with pytest.raises(ValueError):
        lipsdp([np.ones((3, 2)), np.ones((1, 4))], (0, 1))
    with pytest.raises(ValueError):
        lipsdp([np.ones((3, 2)), np.ones((1, 3))], (1, 1))


# ----------------------------------------------------------------------------- loop transformation

def test_loop_transform_is_a_congruence_with_equal_certificates():
    rng = np.random.default_rng(5)
    ws = _rand_net(rng, [4, 6, 5, 2], 2.0)
    sl = [GELU, (0.2, 0.9)]
    r = lipsdp(ws, sl)
    J = loop_jacobian(ws, sl)
    Mp = lmi_matrix(ws, sl, r.T, r.rho)
    Ml = lmi_matrix(ws, sl, r.T, r.rho, form="loop")
    np.testing.assert_allclose(Ml, J.T @ Mp @ J, atol=1e-10)
    assert np.linalg.det(J) != 0  # invertible: the two LMIs have the same feasible (rho, T)
    # the loop form with c != 0 and 2 hidden layers is not block tridiagonal (x_2 sees psi_0)
    n0, n1 = 4, 6
    assert np.abs(Ml[:n0, n0 + n1:]).max() > 0
    # smallest rho for this T, by bisection on the dense loop-form eigenvalue = the plain-form formula
    lo, hi = 0.0, 4 * r.rho
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if np.linalg.eigvalsh(lmi_matrix(ws, sl, r.T, mid, "loop"))[-1] <= 0 else (mid, hi)
    assert abs(hi - rho_for_T(ws, sl, r.T)) <= 1e-8 * hi


def test_cvxpy_plain_and_loop_forms_certify_the_same_value():
    pytest.importorskip("cvxpy")
    from lipverify.bounds.lipsdp_cvxpy import lipsdp_cvxpy
    rng = np.random.default_rng(6)
    ws = _rand_net(rng, [3, 5, 4, 2], 2.0)
    sl = [GELU, GELU]
    plain = lipsdp_cvxpy(ws, sl, eps=1e-8, form="plain")
    loop = lipsdp_cvxpy(ws, sl, eps=1e-8, form="loop")
    fast = lipsdp(ws, sl)
    # SCS is accurate to ~1e-5 here; both forms land on the same optimum, which the fast path matches
    assert abs(plain.value - loop.value) <= 1e-4 * plain.value
    assert fast.value <= min(plain.value, loop.value) * (1 + 1e-7)
    assert fast.value >= min(plain.value, loop.value) * (1 - 1e-4)
    for r in (plain, loop):
        assert r.solver == "cvxpy-scs" and verify_lipsdp(ws, sl, r.T, r.rho)[0]
    via_api = lipsdp(ws, sl, "layer", solver="cvxpy")
    assert via_api.solver == "cvxpy-scs" and via_api.value >= fast.value * (1 - 1e-6)


# ----------------------------------------------------------------------------- what happened

def test_convergence_is_reported_with_a_duality_gap():
    rng = np.random.default_rng(11)
    ws = _rand_net(rng, [12, 20, 20, 20, 4], 2.0)
    r = lipsdp(ws, (0, 1))
    assert r.converged and "relative duality gap" in r.stop
    assert 0 <= r.gap <= 1e-4  # the verified rho against the dual bound (repair adds a little)
    assert r.dual_value <= r.value
    assert r.info["newton_steps"] > 0
    cut = lipsdp(ws, (0, 1), max_steps=2)
    assert not cut.converged and "iteration limit" in cut.stop
    assert cut.value >= r.value * (1 - 1e-9)  # still a verified bound
    budget = lipsdp(ws, (0, 1), time_budget_s=0.0)
    assert not budget.converged and "cut by the time budget" in budget.stop
    assert verify_lipsdp(ws, (0, 1), budget.T, budget.rho)[0]


def test_method_entry_and_table_say_what_happened():
    from lipverify.bounds import BoundContext, get_method
    from lipverify.graph.ir import Graph, Node
    from lipverify.ops.activation import ReLU
    from lipverify.ops.dense import Dense
    from lipverify.report.table import solver_status
    from lipverify.timebudget import TimeBudget

    rng = np.random.default_rng(12)
    ws = _rand_net(rng, [6, 9, 9, 3], 2.0)
    g = Graph("x", (6,))
    prev = "x"
    for k, w in enumerate(ws):
        g.nodes.append(Node(f"d{k}", Dense(torch.as_tensor(w)), [prev], (w.shape[0],)))
        prev = f"d{k}"
        if k < len(ws) - 1:
            g.nodes.append(Node(f"a{k}", ReLU(), [prev], (w.shape[0],)))
            prev = f"a{k}"
    g.output = prev
    full = get_method("lipsdp-neuron").run(g, BoundContext())
    assert full.solver["converged"] and full.solver["duality_gap"] <= 1e-4
    assert solver_status(full.solver).startswith("(converged")
    cut = get_method("lipsdp-neuron").run(g, BoundContext(time_budget=TimeBudget(0.0)))
    assert not cut.solver["converged"] and "cut by the time budget" in solver_status(cut.solver)
    assert any("not converged" in n for n in cut.notes)


def test_block_algebra_matches_dense_autograd():
    """Chain's log det, gradient, exact Hessian, Layer Hessian and Lanczos step length against dense torch."""
    from lipverify.bounds.lipsdp_blocks import Chain

    rng = np.random.default_rng(13)
    ws = _rand_net(rng, [7, 5, 6, 4, 3])
    sl = [GELU, (0.1, 1.0), (0.0, 1.0)]
    ch = Chain(ws, sl)
    o = ch.block_offsets

    def dense(x):
        D, C = ch.blocks(x[0], ch.split(x[1:]))
        rows = []
        for a in range(ch.l + 1):
            row = []
            for b in range(ch.l + 1):
                blk = D[a] if a == b else C[a] if b == a + 1 else C[b].T if a == b + 1 else \
                    torch.zeros(o[a + 1] - o[a], o[b + 1] - o[b], dtype=torch.float64)
                row.append(blk)
            rows.append(torch.cat(row, 1))
        return torch.cat(rows, 0)

    from lipverify.bounds.lipsdp_core import start_multipliers, _prepare
    T0 = np.concatenate(start_multipliers(*_prepare(ws, sl)))
    x = torch.as_tensor(np.concatenate([[3.0 * ch.rho_min(ch.split(torch.as_tensor(T0)))], T0 * 1.3]))
    f = lambda v: -torch.logdet(dense(v))  # noqa: E731
    fac = ch.factor(float(x[0]), ch.split(x[1:]))
    assert abs(-fac.logdet - float(f(x))) <= 1e-10 * abs(float(f(x)))
    Sd, So = ch.selected_inverse(fac)
    g_rho, g_t = ch.gradient(Sd, So)
    g = torch.autograd.functional.jacobian(f, x)
    torch.testing.assert_close(torch.cat([g_rho.reshape(1), g_t]), g, rtol=1e-9, atol=1e-12)
    H = torch.autograd.functional.hessian(f, x)
    h_rr, h_rt, Htt = ch.hessian(fac, Sd)
    torch.testing.assert_close(Htt, H[1:, 1:], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(h_rt, H[0, 1:], rtol=1e-9, atol=1e-12)
    assert abs(float(h_rr) - float(H[0, 0])) <= 1e-9 * float(H[0, 0])
    E = torch.zeros(ch.N, ch.l, dtype=torch.float64)
    for k in range(ch.l):
        E[ch.offsets[k]:ch.offsets[k + 1], k] = 1
    _, h_rt_l, Hl = ch.hessian(fac, Sd, layer=True)
    torch.testing.assert_close(Hl, E.T @ H[1:, 1:] @ E, rtol=1e-9, atol=1e-12)
    d = torch.as_tensor(rng.normal(size=x.shape[0])) * x
    A0, A1 = dense(x), dense(x + d) - dense(x)
    L = torch.linalg.cholesky(A0)
    M = torch.linalg.solve_triangular(L, torch.linalg.solve_triangular(L, A1, upper=False).T, upper=False)
    exact = -1.0 / float(torch.linalg.eigvalsh((M + M.T) / 2)[0])
    assert abs(ch.max_step(fac, float(d[0]), ch.split(d[1:]), iters=40) - exact) <= 1e-8 * exact
