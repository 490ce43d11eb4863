"""lipsdp-graph: per-frequency conv LMIs, residual blocks, and the trusted checker.

Soundness chain on small CNNs: per-frequency LMI (channel-tied multipliers, lifted to a torus)
>= exact unrolled LipSDP with the same channel-tied multipliers >= unrolled per-neuron LipSDP
>= sampled lower bound; the lifted polyphase convolution reproduces the real one; tampered
witnesses are rejected.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lipverify.attack import lower_bound
from lipverify.bounds import METHODS, BoundContext
from lipverify.errors import SoundnessError
from lipverify.graph.ir import Graph, Node
from lipverify.ops.activation import GELU, LeakyReLU, ReLU
from lipverify.ops.conv import Conv
from lipverify.ops.dense import Dense
from lipverify.ops.merge import Add
from lipverify.ops.pool import MaxPool, Reduce
from lipverify.ops.shape import Reshape
from lipverify.verifier import verify
from lipverify.verifier.conv import coarse_kernel
from lipverify.verifier.lipsdp_graph import verify_lipsdp_graph
from lipverify.verifier.sdp_graph import freq_segment, relaxed_slopes

FREQ = {"lipsdp_graph_unroll_max": 0, "lipsdp_graph_head_activation": False}
TIED = {"lipsdp_graph_unroll_max": 10**6, "lipsdp_graph_dense_multipliers": "channel"}
NEURON = {"lipsdp_graph_unroll_max": 10**6}


def _graph(input_shape, steps) -> Graph:
    """steps: list of (op, [input names or None for the previous tensor])."""
    g = Graph("x", tuple(input_shape))
    prev = "x"
    shapes = {"x": tuple(input_shape)}
    for k, (op, inputs) in enumerate(steps):
        ins = inputs or [prev]
        with torch.no_grad():
            out = op.forward(*[torch.zeros((1,) + shapes[i], dtype=torch.float64) for i in ins])
        name = f"t{k}"
        shapes[name] = tuple(out.shape[1:])
        g.nodes.append(Node(name, op, ins, shapes[name], name))
        prev = name
    g.output = prev
    return g


def _conv(gen, c_in, c_out, k=3, stride=1, pad=1, dilation=1, groups=1, scale=0.6):
    w = torch.randn((c_out, c_in // groups, k, k), generator=gen, dtype=torch.float64) * scale
    return Conv(w, torch.randn(c_out, generator=gen, dtype=torch.float64) * 0.1, (stride, stride),
                (pad, pad, pad, pad), (dilation, dilation), groups)


def small_cnn(seed: int, act=ReLU) -> Graph:
    gen = torch.Generator().manual_seed(seed)
    steps = [(_conv(gen, 1, 3), None), (act(), None), (_conv(gen, 3, 4, stride=2), None), (act(), None)]
    g = _graph((1, 6, 6), steps)
    flat = math.prod(g.output_shape)
    return _graph((1, 6, 6), steps + [(Reshape((flat,)), None),
                                      (Dense(torch.randn((3, flat), generator=gen, dtype=torch.float64) * 0.3), None)])


def conv_residual(seed: int) -> Graph:
    """x -> relu(conv0 x) = h; y = relu(h + conv2(relu(conv1 h))); mean; dense."""
    gen = torch.Generator().manual_seed(seed)
    steps = [(_conv(gen, 1, 3), None), (ReLU(), None), (_conv(gen, 3, 3), None), (ReLU(), None),
             (_conv(gen, 3, 3), None), (Add(), ["t1", "t4"]), (ReLU(), None),
             (Reduce((1, 2), keepdims=False), None),
             (Dense(torch.randn((2, 3), generator=gen, dtype=torch.float64)), None)]
    return _graph((1, 5, 5), steps)


def _run(graph, options):
    result = METHODS["lipsdp-graph"].run(graph, BoundContext(options=dict(options)))
    assert verify(graph, result)  # the trusted checker accepts the method's own witness
    return result


def _lower(graph) -> float:
    from conftest import graph_as_file

    return lower_bound(graph_as_file(graph), graph, starts=4, seed=0, effort=0.1).value


# ----------------------------------------------------------------------------------------------
# the lifted (polyphase, periodic) convolution is the real one restricted


@pytest.mark.parametrize("stride,pad,dilation,groups,n", [(1, 1, 1, 1, 5), (2, 1, 1, 1, 7), (2, 0, 1, 2, 6),
                                                          (1, 2, 2, 1, 5), (3, 1, 1, 1, 8)])
def test_lifted_convolution_restricts_to_the_real_one(stride, pad, dilation, groups, n):
    gen = torch.Generator().manual_seed(stride * 10 + n)
    conv = _conv(gen, 2, 4, k=3, stride=stride, pad=pad, dilation=dilation, groups=groups)
    g = _graph((2, n, n), [(conv, None), (ReLU(), None)])
    seg = freq_segment(g, "x", "t1")
    p_in, p_out = seg.phase["x"], seg.phase["t0"]
    grid = seg.required_grid
    k, lo = coarse_kernel(conv.weight, groups, conv.stride, conv.pads, conv.dilation, p_in, p_out)
    x = torch.randn((1, 2, n, n), generator=gen, dtype=torch.float64)
    real = conv.apply(x)[0]
    # polyphase embedding of x on the coarse torus (zero at non-real slots)
    lifted = torch.zeros((2 * p_in[0] * p_in[1],) + grid, dtype=torch.float64)
    for c in range(2):
        for i in range(n):
            for j in range(n):
                ph = (i % p_in[0]) * p_in[1] + j % p_in[1]
                lifted[c * p_in[0] * p_in[1] + ph, i // p_in[0], j // p_in[1]] = x[0, c, i, j]
    out = torch.zeros((k.shape[0],) + grid, dtype=torch.float64)
    for a in range(k.shape[2]):
        for b in range(k.shape[3]):
            shifted = torch.roll(lifted, shifts=(-(lo[0] + a), -(lo[1] + b)), dims=(1, 2))
            out += torch.einsum("oc,cij->oij", k[:, :, a, b], shifted)
    po = p_out[0] * p_out[1]
    for o in range(real.shape[0]):
        for i in range(real.shape[1]):
            for j in range(real.shape[2]):
                ph = (i % p_out[0]) * p_out[1] + j % p_out[1]
                assert abs(float(out[o * po + ph, i // p_out[0], j // p_out[1]]) - float(real[o, i, j])) < 1e-12


def test_slopes_widened_to_contain_zero_only_when_lifted():
    assert relaxed_slopes(LeakyReLU(0.1), padded=True) == (0.0, 1.0)
    assert relaxed_slopes(LeakyReLU(0.1), padded=False) == (0.1, 1.0)
    a, b = GELU().slopes
    assert relaxed_slopes(GELU(), padded=True) == (a, b)  # alpha < 0: already contains 0


# ----------------------------------------------------------------------------------------------
# the soundness chain


@pytest.mark.parametrize("seed", [0, 1])
def test_frequency_lmi_dominates_unrolled_channel_tied_and_neuron(seed):
    g = small_cnn(seed)
    freq = _run(g, FREQ)
    assert [s["kind"] for s in freq.witness["segments"]] == ["freq", "dense"]
    tied = _run(g, TIED)
    neuron = _run(g, NEURON)
    assert [s["kind"] for s in tied.witness["segments"]] == ["dense"]
    assert freq.value >= tied.value * (1 - 1e-6)
    assert tied.value >= neuron.value * (1 - 1e-6)
    assert neuron.value >= _lower(g)


def test_gelu_cnn_chain():
    g = small_cnn(3, act=GELU)
    freq, neuron = _run(g, FREQ), _run(g, NEURON)
    assert freq.value >= neuron.value * (1 - 1e-6) >= _lower(g) * (1 - 1e-6)


def test_single_convolution_is_its_circulant_norm():
    gen = torch.Generator().manual_seed(5)
    conv = _conv(gen, 2, 3, k=3, pad=1)
    g = _graph((2, 5, 5), [(conv, None)])
    r = _run(g, FREQ)
    grid = r.witness["segments"][0]["grid"]
    # max over the torus frequencies of sigma_max(Khat), by an FFT of the zero-embedded kernel
    emb = torch.zeros((3, 2) + tuple(grid), dtype=torch.float64)
    emb[:, :, :3, :3] = conv.weight
    sym = torch.fft.fft2(emb).permute(2, 3, 0, 1)
    circ = float(torch.linalg.matrix_norm(sym, ord=2).max())
    assert r.value == pytest.approx(circ, rel=1e-6)


def test_leaky_relu_cnn_chain():
    # lifted slopes are widened to [0, 1] (padded positions act like slope 0); unrolled keep [0.1, 1]
    g = small_cnn(4, act=lambda: LeakyReLU(0.1))
    freq, neuron = _run(g, FREQ), _run(g, NEURON)
    assert freq.value >= neuron.value * (1 - 1e-6) >= _lower(g) * (1 - 1e-6)


def test_conv_residual_block():
    g = conv_residual(0)
    freq = _run(g, FREQ)
    assert "freq" in [s["kind"] for s in freq.witness["segments"]]
    neuron = _run(g, NEURON)
    product = METHODS["product"].run(g, BoundContext()).value
    assert _lower(g) <= neuron.value * (1 + 1e-9) <= freq.value * (1 + 1e-6)
    assert freq.value < product


def test_mean_of_a_convolution_is_refused():
    gen = torch.Generator().manual_seed(0)
    g = _graph((1, 4, 4), [(_conv(gen, 1, 2), None), (ReLU(), None), (_conv(gen, 2, 2), None),
                           (Reduce((1, 2), keepdims=False), None)])
    with pytest.raises(SoundnessError, match="global mean"):
        freq_segment(g, "x", g.output)


def test_deterministic():
    g = small_cnn(0)
    a, b = _run(g, FREQ), _run(g, FREQ)
    assert a.value == b.value and a.witness == b.witness


# ----------------------------------------------------------------------------------------------
# tampering


@pytest.fixture(scope="module")
def freq_cert():
    g = small_cnn(1)
    return g, _run(g, FREQ)


def _scale_input(w, f):
    w["rho"] *= f
    w["weights"]["x"] = [v * f for v in w["weights"]["x"]]


TAMPERS = {
    "rho and input weights lowered": lambda w: _scale_input(w, 1 - 1e-4),
    "rho below an input weight": lambda w: w.__setitem__("rho", w["rho"] * (1 - 1e-6)),
    "output weight below 1": lambda w: w["weights"].__setitem__(w["segments"][-1]["exit"],
                                                                [0.999] * len(w["weights"][w["segments"][-1]["exit"]])),
    "negative multiplier": lambda w: next(iter(w["segments"][0]["t"].values())).__setitem__(0, -1.0),
    "nan multiplier": lambda w: next(iter(w["segments"][0]["t"].values())).__setitem__(0, float("nan")),
    "grid too small": lambda w: w["segments"][0].__setitem__("grid", [g - 1 for g in w["segments"][0]["grid"]]),
    "segment dropped": lambda w: w["segments"].pop(),
    "wrong kind": lambda w: w["segments"][0].__setitem__("kind", "tied"),
    "missing multipliers": lambda w: w["segments"][0]["t"].popitem(),
    "short multiplier vector": lambda w: next(iter(w["segments"][0]["t"].values())).pop(),
    "bool multiplier": lambda w: next(iter(w["segments"][0]["t"].values())).__setitem__(0, True),
    "nested multiplier": lambda w: next(iter(w["segments"][0]["t"].values())).__setitem__(0, [1.0]),
    "multipliers for an unknown activation": lambda w: w["segments"][0]["t"].__setitem__("ghost", [1.0]),
    "huge multiplier": lambda w: next(iter(w["segments"][0]["t"].values())).__setitem__(0, 1e300),
    "huge inner weights": lambda w: w["weights"].__setitem__(w["segments"][0]["exit"],
                                                             [1e300] * len(w["weights"][w["segments"][0]["exit"]])),
    "rho nan": lambda w: w.__setitem__("rho", float("nan")),
    "rho inf": lambda w: w.__setitem__("rho", float("inf")),
    "rho negative": lambda w: w.__setitem__("rho", -1.0),
    "rho a string": lambda w: w.__setitem__("rho", "1e9"),
    "input weight nan": lambda w: w["weights"]["x"].__setitem__(0, float("nan")),
    "inner weight negative": lambda w: w["weights"][w["segments"][0]["exit"]].__setitem__(0, -1.0),
    "inner weights too short": lambda w: w["weights"][w["segments"][0]["exit"]].pop(),
    "output weight inf": lambda w: w["weights"][w["segments"][-1]["exit"]].__setitem__(0, float("inf")),
    "grid of the wrong rank": lambda w: w["segments"][0].__setitem__("grid", w["segments"][0]["grid"][:-1]),
    "grid not integers": lambda w: w["segments"][0].__setitem__("grid", [float(g) for g in w["segments"][0]["grid"]]),
    "grid far too large": lambda w: w["segments"][0].__setitem__("grid", [100 * g for g in w["segments"][0]["grid"]]),
    "grid zero": lambda w: w["segments"][0].__setitem__("grid", [0 for _ in w["segments"][0]["grid"]]),
    "extra top-level entry": lambda w: w.__setitem__("frequencies", [[0, 0]]),
    "extra segment entry": lambda w: w["segments"][0].__setitem__("frequencies", [[0, 0]]),
    "weights of a tensor that is no boundary": lambda w: w["weights"].__setitem__("t0", [1.0] * 3),
    "granularity of a tensor that is no activation there": lambda w: w["segments"][1].__setitem__(
        "granularity", {w["segments"][1]["entry"]: "channel"}),
    "layerwise part without a layerwise segment": lambda w: w.__setitem__(
        "layerwise", {"scalings": {}, "tensors": {}, "factors": {}}),
    "segments out of chain": lambda w: w["segments"][1].__setitem__("entry", "t2"),
    "segments reversed": lambda w: w["segments"].reverse(),
    "segment repeated": lambda w: w["segments"].insert(1, copy.deepcopy(w["segments"][0])),
    "segment not an object": lambda w: w["segments"].__setitem__(1, "dense"),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampered_witness_rejected(freq_cert, name):
    g, result = freq_cert
    w = copy.deepcopy(result.witness)
    TAMPERS[name](w)
    with pytest.raises(SoundnessError):  # a clean refusal, never a crash
        verify_lipsdp_graph(g, result.value, w)


def test_every_frequency_of_the_grid_is_checked(freq_cert):
    g, result = freq_cert
    grid = result.witness["segments"][0]["grid"]
    implied, detail = verify_lipsdp_graph(g, result.value, result.witness)
    assert implied == result.value  # the method claims exactly what its witness implies
    assert f"{math.prod(grid[:-1]) * (grid[-1] // 2 + 1)} frequencies" in detail


def test_certificate_of_another_network_rejected(freq_cert):
    # the checker re-derives kernels from the graph: the same witness on stronger weights fails
    g, result = freq_cert
    g2 = copy.deepcopy(g)
    g2.nodes[0].op.weight = g2.nodes[0].op.weight * 1.5
    with pytest.raises(SoundnessError):
        verify_lipsdp_graph(g2, result.value, result.witness)


def test_claimed_value_below_sqrt_rho_rejected(freq_cert):
    g, result = freq_cert
    with pytest.raises(SoundnessError):
        verify_lipsdp_graph(g, math.sqrt(result.witness["rho"]) * (1 - 1e-9), result.witness)


def test_tied_segment_between_lmis():
    gen = torch.Generator().manual_seed(2)
    g = _graph((1, 6, 6), [(_conv(gen, 1, 2), None), (ReLU(), None), (MaxPool((2, 2), (2, 2), (0, 0, 0, 0)), None),
                           (_conv(gen, 2, 2), None), (ReLU(), None)])
    r = _run(g, FREQ)
    assert [s["kind"] for s in r.witness["segments"]] == ["freq", "tied", "freq"]
    assert _lower(g) <= r.value
    # on a 6x6 image the lifted LMI can lose to exact unrolled norms; by default such small stages
    # are unrolled (exact LipSDP), never above the product bound
    default = _run(g, {})
    assert _lower(g) <= default.value <= METHODS["product"].run(g, BoundContext()).value * (1 + 1e-9)
    w = copy.deepcopy(r.witness)
    w["segments"][1]["factor"] *= 0.5  # below the pool's certified factor
    with pytest.raises(SoundnessError, match="factor"):
        verify_lipsdp_graph(g, r.value, w)
    w = copy.deepcopy(r.witness)
    exit_ = w["segments"][1]["exit"]
    w["weights"][exit_] = [v * 1.01 for v in w["weights"][exit_]]  # weights must shrink across the pool
    with pytest.raises(SoundnessError):
        verify_lipsdp_graph(g, r.value, w)


def test_dense_chain_equals_lipsdp_neuron():
    from conftest import FIXTURES
    from lipverify.certify import build_graph
    from lipverify.load import load_model

    g, _ = build_graph(load_model(FIXTURES / "mlp.onnx"))
    assert METHODS["lipsdp-graph"].not_applicable(g)  # auto leaves dense chains to lipsdp-neuron
    ours = _run(g, {})
    ref = METHODS["lipsdp-neuron"].run(g, BoundContext())
    assert ours.value == pytest.approx(ref.value, rel=1e-6)


def test_dense_residual_fixture():
    from conftest import FIXTURES
    from lipverify.certify import build_graph
    from lipverify.load import load_model

    g, _ = build_graph(load_model(FIXTURES / "resmlp.onnx"))
    r = _run(g, {})
    assert [s["kind"] for s in r.witness["segments"]] == ["dense"]
    # the block LMI's optimum (reproduced by cvxpy + Clarabel: 89.3864) is below the scaled product
    assert r.value == pytest.approx(89.3864, rel=1e-4)
    assert r.value < METHODS["layerwise"].run(g, BoundContext(options={"layerwise_steps": 50})).value


# ----------------------------------------------------------------------------------------------
# skipping LMIs that cannot beat layerwise (a choice between certified candidates)


def _with_layerwise_tail(gen, front):
    """``front`` on a (1, 4, 4) input, then flatten and a dense head planned as layerwise (dense cap 10)."""
    flat = math.prod(_graph((1, 4, 4), front).output_shape)
    return _graph((1, 4, 4), front + [(Reshape((flat,)), None),
                                      (Dense(torch.randn((16, flat), generator=gen, dtype=torch.float64) * 0.3), None),
                                      (ReLU(), None),
                                      (Dense(torch.randn((2, 16), generator=gen, dtype=torch.float64) * 0.3), None)])


def test_one_hidden_layer_lmi_is_not_skipped():
    # relu(x) + relu(-x) = |x| per position: LipSDP gives 1, the scaled product 2
    w1 = torch.tensor([1.0, -1.0], dtype=torch.float64).reshape(2, 1, 1, 1)
    w2 = torch.tensor([1.0, 1.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    conv = lambda w: Conv(w, None, (1, 1), (0, 0, 0, 0), (1, 1), 1)  # noqa: E731
    g = _with_layerwise_tail(torch.Generator().manual_seed(0), [(conv(w1), None), (ReLU(), None), (conv(w2), None)])
    opts = {"lipsdp_graph_dense_max": 10}
    r = _run(g, opts)
    assert r.witness["segments"][0]["kind"] != "layerwise"
    assert r.value < 0.6 * METHODS["layerwise"].run(g, BoundContext()).value


def test_skipped_single_activation_stage_is_no_worse(monkeypatch):
    import lipverify.bounds.lipsdp_graph as mod

    gen = torch.Generator().manual_seed(4)
    g = _with_layerwise_tail(gen, [(_conv(gen, 1, 2), None), (ReLU(), None)])
    opts = {"lipsdp_graph_dense_max": 10, "lipsdp_graph_unroll_max": 0}
    skipped = _run(g, opts)
    assert skipped.witness["segments"][0] == {"kind": "layerwise", "entry": "x", "exit": "t1"}
    monkeypatch.setattr(mod, "_cannot_beat_scaled_norm", lambda block: False)
    solved = _run(g, opts)
    assert any(n.startswith("lipsdp-graph: x -> t1") for n in solved.notes)  # the LMI was solved
    assert not any(n.startswith("lipsdp-graph: x -> t1") for n in skipped.notes)
    assert skipped.value <= solved.value * (1 + 1e-6)


def test_spent_budget_keeps_layerwise_and_says_so():
    from lipverify.timebudget import TimeBudget

    w1 = torch.tensor([1.0, -1.0], dtype=torch.float64).reshape(2, 1, 1, 1)
    w2 = torch.tensor([1.0, 1.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    conv = lambda w: Conv(w, None, (1, 1), (0, 0, 0, 0), (1, 1), 1)  # noqa: E731
    g = _with_layerwise_tail(torch.Generator().manual_seed(0), [(conv(w1), None), (ReLU(), None), (conv(w2), None)])
    ctx = BoundContext(options={"lipsdp_graph_dense_max": 10}, time_budget=TimeBudget(1e-9))
    r = METHODS["lipsdp-graph"].run(g, ctx)
    assert verify(g, r)
    assert [s["kind"] for s in r.witness["segments"]][0] == "layerwise"
    assert any(c.startswith("lipsdp-graph: 1 run(s) kept the layerwise factor") for c in ctx.time_budget.cuts)
