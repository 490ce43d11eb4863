"""Differential soundness campaign: random networks, every method, a stronger independent attack.

A certified bound is only as good as its worst answer, so we test the whole pipeline (torch ->
ONNX export -> extraction -> every bound method -> independent verifier) against things it does
not share code with:

* ``random_network``: a seeded generator of small torch networks over every supported operation
  and activation (dense, conv with stride/padding/groups/dilation, zero padding, BatchNorm, avg /
  max / global pooling, residual blocks, concat, flatten; ReLU, LeakyReLU incl. negative and
  large slopes, Tanh, Sigmoid, ELU, Softplus, GELU (erf and tanh), SiLU). Activation parameters
  are dyadic rationals so that the float32 attribute stored in the ONNX file equals the float64
  value torch uses (otherwise the certified network and the attacked one would differ by 1 ulp).
* ``attack``: a lower bound on the Lipschitz constant of the ORIGINAL torch model in float64,
  written here, independent of ``lipverify.attack``: random pair quotients at many scales,
  multi-start gradient ascent on the difference quotient ``||f(x + h v) - f(x - h v)|| / 2h||v||``
  over both x and v (power-iteration initialised), then a shrinking local random search. Every
  number it reports is a difference quotient evaluated in float64, hence a true lower bound.
* ``exact_relu_lipschitz``: the exact global Lipschitz constant of a tiny dense ReLU network:
  the maximum of ``||W_l D_{l-1} ... D_0 W_0||_2`` over activation patterns whose region has
  non-empty interior. Patterns are enumerated neuron by neuron; a partial pattern is kept when a
  sample point realises it with a margin, else when ``scipy.optimize.linprog`` finds a point
  with a positive margin (Chebyshev-style LP); leaves are confirmed by evaluating the network at
  the witness point. Confirmed pieces give a rigorous lower value, confirmed + LP-ambiguous ones
  an upper value; they coincide in practice.
* ``check_network``: export, certify with ``method="all"``, attack, compare, and return one
  JSON-serialisable record. A *violation* is any certified bound below ``attack * (1 - tol)``
  or below the exact value; orderings that the theory guarantees (LipSDP-Neuron <= LipSDP-Layer
  <= product, layerwise <= product) are checked where both methods ran.
"""

from __future__ import annotations

import copy
import importlib
import io
import math
import pkgutil
import signal
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "elu", "softplus", "gelu", "silu")
FAMILIES = ("tiny_relu", "mlp", "cnn")
ADVERSARIAL_SHARE = 0.4  # share of seeds that get a hand-written adversarial file (lipverify.adversarial)

# A certified bound below attack * (1 - SOUND_TOL) is a violation. The attack value is a float64
# difference quotient (relative rounding error ~1e-12 at the step sizes used), so 1e-9 is tight.
SOUND_TOL = 1e-9
# When torch's exporter folds BatchNorm into the preceding conv/gemm it does so in float32: the
# ONNX weights then differ from the torch model's by a few float32 ulps per entry, and the two
# networks' Lipschitz constants by up to ~1e-6 relative. Such networks get this tolerance.
FOLDED_BN_TOL = 1e-5
ORDER_TOL = 1e-7  # orderings between methods: solver/rounding slack, reported as quality issues
ORDERINGS = (("lipsdp-neuron", "lipsdp-layer"), ("lipsdp-layer", "product"), ("lipsdp-neuron", "product"),
             ("layerwise", "product"))


def load_all_methods() -> dict:
    """Import every module of ``lipverify.bounds`` (registration happens at import).

    Methods are being added by other modules over time: whatever ``METHODS`` holds afterwards is
    what the campaign tests. A module that fails to import is reported, not hidden.
    """
    import lipverify.bounds as bounds

    failed = {}
    for info in pkgutil.iter_modules(bounds.__path__):
        try:
            importlib.import_module(f"lipverify.bounds.{info.name}")
        except Exception as exc:  # a half-written method must not stop the campaign
            failed[info.name] = f"{type(exc).__name__}: {exc}"
    return failed


# ----------------------------------------------------------------------------------------------
# Random networks
# ----------------------------------------------------------------------------------------------


class Residual(nn.Module):
    """y = x + body(x)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Concat(nn.Module):
    """y = cat([a(x), b(x)], dim=1) (features for dense nets, channels for conv nets)."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


@dataclass
class RandomNet:
    seed: int
    family: str
    module: nn.Module
    input_shape: tuple[int, ...]
    ops: list[str]  # what the generator used (e.g. "conv(s2,p1,g2,d1)", "leaky_relu(-0.5)")
    has_bn: bool = False
    dense_weights: list[np.ndarray] | None = None  # tiny ReLU nets: W_0..W_l (out, in), float64
    dense_biases: list[np.ndarray] | None = None


def _activation(rng: np.random.Generator, name: str | None = None) -> tuple[nn.Module, str]:
    name = name or str(rng.choice(ACTIVATIONS))
    if name == "relu":
        return nn.ReLU(), "relu"
    if name == "leaky_relu":
        a = float(rng.choice([0.0625, 0.125, 0.5, -0.25, -0.5, -1.5, 2.0]))  # dyadic: exact in float32
        return nn.LeakyReLU(a), f"leaky_relu({a:g})"
    if name == "tanh":
        return nn.Tanh(), "tanh"
    if name == "sigmoid":
        return nn.Sigmoid(), "sigmoid"
    if name == "elu":
        a = float(rng.choice([1.0, 0.5, 2.0]))
        return nn.ELU(a), f"elu({a:g})"
    if name == "softplus":
        return nn.Softplus(), "softplus"
    if name == "gelu":
        approx = str(rng.choice(["none", "tanh"]))
        return nn.GELU(approximate=approx), f"gelu({approx})"
    if name == "silu":
        return nn.SiLU(), "silu"
    raise ValueError(name)


def _init_(module: nn.Module, rng: np.random.Generator, gain: float) -> None:
    """Random weights with a random overall scale (so bounds range over orders of magnitude)."""
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (gain / math.sqrt(fan_in)))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = m.num_features
                m.weight.copy_(torch.randn(c, generator=gen) * 1.5)  # signs of both kinds
                m.bias.copy_(torch.randn(c, generator=gen))
                m.running_mean.copy_(torch.randn(c, generator=gen))
                m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.05)


def _out_shape(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(module.eval()(torch.zeros((1,) + tuple(shape))).shape[1:])


def _tiny_relu(seed: int, rng: np.random.Generator) -> RandomNet:
    n_in = int(rng.integers(2, 4))
    hidden = [int(rng.integers(2, 7)) for _ in range(int(rng.integers(1, 3)))]
    n_out = int(rng.integers(1, 4))
    sizes = [n_in] + hidden + [n_out]
    layers: list[nn.Module] = []
    for k in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[k], sizes[k + 1]))
        if k < len(sizes) - 2:
            layers.append(nn.ReLU())
    module = nn.Sequential(*layers)
    _init_(module, rng, gain=float(rng.choice([0.5, 1.0, 2.0])))
    lin = [m for m in module if isinstance(m, nn.Linear)]
    ws = [m.weight.detach().double().numpy().copy() for m in lin]
    bs = [m.bias.detach().double().numpy().copy() for m in lin]
    ops = ["linear"] * len(lin) + ["relu"] * len(hidden)
    return RandomNet(seed, "tiny_relu", module.eval(), (n_in,), ops, False, ws, bs)


def _mlp(seed: int, rng: np.random.Generator) -> RandomNet:
    width = int(rng.integers(1, 13))
    shape = (width,)
    layers: list[nn.Module] = []
    ops: list[str] = []
    has_bn = False
    for _ in range(int(rng.integers(1, 5))):
        kind = str(rng.choice(["dense", "dense", "residual", "concat", "bn"]))
        w = shape[0]
        if kind == "dense":
            out = int(rng.integers(1, 17))
            act, label = _activation(rng)
            layers += [nn.Linear(w, out), act]
            ops += ["linear", label]
        elif kind == "residual":
            mid = int(rng.integers(1, 17))
            act, label = _activation(rng)
            body = [nn.Linear(w, mid), act, nn.Linear(mid, w)]
            if rng.random() < 0.3:
                act2, label2 = _activation(rng)
                body.append(act2)
                ops.append(label2)
            layers.append(Residual(nn.Sequential(*body)))
            ops += ["residual", "linear", label]
        elif kind == "concat":
            a_out, b_out = int(rng.integers(1, 9)), int(rng.integers(1, 9))
            act, label = _activation(rng)
            layers.append(Concat(nn.Linear(w, a_out), nn.Sequential(nn.Linear(w, b_out), act)))
            ops += ["concat", "linear", label]
        else:
            layers.append(nn.BatchNorm1d(w))
            ops.append("batchnorm1d")
            has_bn = True
        shape = _out_shape(nn.Sequential(*layers), (width,))
    layers.append(nn.Linear(shape[0], int(rng.integers(1, 5))))
    ops.append("linear")
    module = nn.Sequential(*layers)
    _init_(module, rng, gain=float(rng.choice([0.5, 1.0, 1.5])))
    return RandomNet(seed, "mlp", module.eval(), (width,), ops, has_bn)


def _conv(rng: np.random.Generator, c_in: int, spatial: int, same: bool = False) -> tuple[nn.Conv2d, str]:
    """A conv whose geometry fits ``spatial``; ``same`` keeps the shape (for residual bodies)."""
    groups = int(rng.choice([g for g in (1, 2, 3) if c_in % g == 0]))
    c_out = c_in if same else groups * int(rng.integers(1, 4))
    if same:
        k = int(rng.choice([1, 3]))
        d = int(rng.choice([1, 2])) if k == 3 and spatial >= 5 else 1
        s, p = 1, d * (k - 1) // 2
    else:
        while True:
            k = int(rng.integers(1, 4))
            d = int(rng.choice([1, 1, 2]))
            s = int(rng.choice([1, 1, 2, 3]))
            p = int(rng.integers(0, 3))
            if spatial + 2 * p - d * (k - 1) >= 1:
                break
    conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, groups=groups, bias=bool(rng.random() < 0.8))
    return conv, f"conv(k{k},s{s},p{p},d{d},g{groups})"


def _cnn(seed: int, rng: np.random.Generator) -> RandomNet:
    c = int(rng.integers(1, 4))
    hw = int(rng.integers(4, 10))
    in_shape = (c, hw, hw)
    shape = in_shape
    layers: list[nn.Module] = []
    ops: list[str] = []
    has_bn = False
    for _ in range(int(rng.integers(1, 5))):
        kind = str(rng.choice(["conv", "conv", "pool", "residual", "concat", "pad"]))
        ch, sp = shape[0], shape[1]
        if kind == "conv":
            conv, label = _conv(rng, ch, sp)
            block: list[nn.Module] = [conv]
            ops.append(label)
            if rng.random() < 0.4:
                block.append(nn.BatchNorm2d(conv.out_channels))
                ops.append("batchnorm2d")
                has_bn = True
            act, alabel = _activation(rng)
            block.append(act)
            ops.append(alabel)
            layers += block
        elif kind == "pool" and sp >= 2:
            k = int(rng.integers(2, min(sp, 3) + 1))
            s = int(rng.integers(1, 3))
            p = int(rng.integers(0, k // 2 + 1))
            if rng.random() < 0.5:
                layers.append(nn.MaxPool2d(k, stride=s, padding=p))
                ops.append(f"maxpool(k{k},s{s},p{p})")
            else:
                cip = bool(rng.random() < 0.5)
                layers.append(nn.AvgPool2d(k, stride=s, padding=p, count_include_pad=cip))
                ops.append(f"avgpool(k{k},s{s},p{p},cip={int(cip)})")
        elif kind == "residual":
            conv, label = _conv(rng, ch, sp, same=True)
            act, alabel = _activation(rng)
            body: list[nn.Module] = [conv]
            if rng.random() < 0.4:
                body.append(nn.BatchNorm2d(ch))
                ops.append("batchnorm2d")
                has_bn = True
            conv2, label2 = _conv(rng, ch, sp, same=True)
            body += [act, conv2]
            layers.append(Residual(nn.Sequential(*body)))
            ops += ["residual", label, alabel, label2]
        elif kind == "concat":
            conv_a, la = _conv(rng, ch, sp, same=True)
            conv_b, lb = _conv(rng, ch, sp, same=True)
            act, alabel = _activation(rng)
            layers.append(Concat(conv_a, nn.Sequential(conv_b, act)))
            ops += ["concat", la, lb, alabel]
        elif kind == "pad":
            pads = tuple(int(v) for v in rng.integers(0, 3, size=4))
            layers.append(nn.ZeroPad2d(pads))
            ops.append(f"zeropad{pads}")
        shape = _out_shape(nn.Sequential(*layers), in_shape)
    if rng.random() < 0.4:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        ops += ["global_avgpool", "flatten"]
        feat = shape[0]
    else:
        layers.append(nn.Flatten())
        ops.append("flatten")
        feat = int(np.prod(shape))
    if rng.random() < 0.4:
        mid = int(rng.integers(2, 9))
        act, alabel = _activation(rng)
        layers += [nn.Linear(feat, mid), act]
        ops += ["linear", alabel]
        feat = mid
    layers.append(nn.Linear(feat, int(rng.integers(1, 5))))
    ops.append("linear")
    module = nn.Sequential(*layers)
    _init_(module, rng, gain=float(rng.choice([0.5, 1.0, 1.5])))
    return RandomNet(seed, "cnn", module.eval(), in_shape, ops, has_bn)


def random_network(seed: int, family: str | None = None) -> RandomNet:
    """A random network; the family is drawn from the seed unless given (40% tiny ReLU)."""
    rng = np.random.default_rng([seed, 7])
    if family is None:
        family = str(rng.choice(FAMILIES, p=[0.4, 0.3, 0.3]))
    build = {"tiny_relu": _tiny_relu, "mlp": _mlp, "cnn": _cnn}[family]
    # a few draws stack too many strided layers for the input size; redraw (deterministically)
    for attempt in range(20):
        try:
            return build(seed, rng if attempt == 0 else np.random.default_rng([seed, 7, attempt]))
        except RuntimeError:
            continue
    raise RuntimeError(f"seed {seed}: no valid {family} network in 20 draws")


def export_onnx(module: nn.Module, input_shape, path, fold: bool = True) -> Path:
    """torch.onnx.export (TorchScript exporter, opset 17, dynamic batch) to ``path``.

    ``fold=False`` keeps BatchNormalization nodes (lipverify folds them in float64); the default
    lets the exporter fold them into the preceding layer (in float32), as users' files usually are.
    """
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn((2,) + tuple(input_shape)),), buf, dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, do_constant_folding=fold)
    Path(path).write_bytes(buf.getvalue())
    return Path(path)


# ----------------------------------------------------------------------------------------------
# The independent attack (lower bound)
# ----------------------------------------------------------------------------------------------


@dataclass
class Attack:
    value: float  # best difference quotient found (a true lower bound on Lip, up to float64 rounding)
    how: str  # which stage found it
    stages: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _bshape(t: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (t.dim() - 1)


def _quotient(f, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||f(x) - f(y)|| / ||x - y|| per sample."""
    num = (f(x) - f(y)).flatten(1).norm(dim=1)
    den = (x - y).flatten(1).norm(dim=1)
    return num / den


def attack(model: nn.Module, input_shape, seed: int = 0, output: int | None = None, starts: int = 64,
           steps: int = 40, pairs: int = 1024, budget_s: float = 5.0) -> Attack:
    """A strong sampled lower bound on Lip(model) in float64 (see the module docstring)."""
    t0 = time.perf_counter()
    net = copy.deepcopy(model).double().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    f = net if output is None else (lambda x: net(x)[:, output:output + 1])
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(input_shape)
    stages: dict[str, float] = {}
    best = [0.0, "none"]

    def note(stage: str, q: torch.Tensor) -> None:
        q = q[torch.isfinite(q)]
        if q.numel():
            v = float(q.max())
            stages[stage] = max(stages.get(stage, 0.0), v)
            if v > best[0]:
                best[0], best[1] = v, stage

    def starts_at(n: int) -> torch.Tensor:
        # pieces of a ReLU network can lie far out (where nearly parallel hyperplanes cross)
        table = torch.tensor([0.1, 1.0, 3.0, 10.0, 100.0, 1000.0], dtype=torch.float64)
        scales = table[torch.randint(0, len(table), (n,), generator=gen)]
        gauss = torch.randn((n,) + shape, generator=gen, dtype=torch.float64) * scales.reshape(_bshape(
            torch.zeros((n,) + shape)))
        unif = torch.rand((n,) + shape, generator=gen, dtype=torch.float64)
        pick = (torch.rand(n, generator=gen) < 0.3).reshape(_bshape(gauss))
        return torch.where(pick, unif, gauss)

    with torch.no_grad():
        # 1. random pairs at many scales
        for r in (1e-4, 1e-2, 0.3, 3.0):
            x = starts_at(int(min(8 * pairs, max(pairs, 4_000_000 // max(math.prod(shape), 1)))))
            d = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            d = d / d.flatten(1).norm(dim=1).reshape(_bshape(d))
            rr = r * (1 + x.flatten(1).norm(dim=1)).reshape(_bshape(x))  # relative to the distance from 0
            note("random pairs", _quotient(f, x - rr * d / 2, x + rr * d / 2))

    # 2. screen a large pool of points by power iteration on J^T J, keep the best as starts
    numel = math.prod(shape)
    pool = int(min(4096, max(starts, 2_000_000 // max(numel, 1))))
    x = starts_at(pool)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    try:
        from torch.func import jvp, vjp

        for _ in range(4):
            _, pull = vjp(f, x)
            _, jv = jvp(f, (x,), (v,))
            (v,) = pull(jv)
            v = v / v.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(_bshape(v))
    except Exception:  # an op without forward-mode AD: the ascent below still works
        v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        hx = 1e-4 * (1 + x.flatten(1).norm(dim=1)).reshape(_bshape(x))
        vn = v / v.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(_bshape(v))
        q = _quotient(f, x + hx * vn, x - hx * vn)
        note("power iteration", q)
        keep = torch.argsort(torch.nan_to_num(q, nan=0.0), descending=True)[:starts]
        x, v = x[keep], vn[keep]
    # 3. multi-start gradient ascent on the difference quotient over (x, v)
    x0 = x.detach()
    size = (1 + x0.flatten(1).norm(dim=1)).reshape(_bshape(x0))  # steps relative to |x| (far-out pieces)
    z = torch.zeros_like(x0, requires_grad=True)
    v = v.clone().requires_grad_(True)
    opt = torch.optim.Adam([z, v], lr=0.05)
    for step in range(steps):
        if time.perf_counter() - t0 > budget_s:
            break
        h = 10 ** (-1 - 3 * step / max(1, steps - 1))  # 0.1 -> 1e-4: wide quotients see kinks first
        vn = v / v.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(_bshape(v))
        x = x0 + size * z
        q = _quotient(f, x + h * size * vn, x - h * size * vn)
        note("gradient ascent", q.detach())
        opt.zero_grad()
        (-torch.log(q.clamp_min(1e-300)).sum()).backward()
        opt.step()
    x = (x0 + size * z).detach()

    # 4. local random search around the best starts with a shrinking radius, small h
    with torch.no_grad():
        vn = v / v.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(_bshape(v))
        xs, vs = x.detach(), vn.detach()
        for h in (1e-3, 1e-5):
            hx = h * (1 + xs.flatten(1).norm(dim=1)).reshape(_bshape(xs))
            note("gradient ascent", _quotient(f, xs + hx * vs, xs - hx * vs))
        scale = 0.3
        for _ in range(16):
            if time.perf_counter() - t0 > budget_s:
                break
            hx = 1e-4 * (1 + xs.flatten(1).norm(dim=1)).reshape(_bshape(xs))
            q = _quotient(f, xs + hx * vs, xs - hx * vs)
            top = torch.argsort(q, descending=True)[: max(1, starts // 4)]
            reps = starts // len(top) + 1
            bx = xs[top].repeat((reps,) + (1,) * len(shape))[:starts]
            bv = vs[top].repeat((reps,) + (1,) * len(shape))[:starts]
            size = (1 + bx.flatten(1).norm(dim=1)).reshape(_bshape(bx))
            nx = bx + scale * size * torch.randn(bx.shape, generator=gen, dtype=torch.float64)
            nv = bv + 0.3 * scale * torch.randn(bv.shape, generator=gen, dtype=torch.float64)
            nv = nv / nv.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(_bshape(nv))
            hx = 1e-4 * (1 + nx.flatten(1).norm(dim=1)).reshape(_bshape(nx))
            note("local search", _quotient(f, nx + hx * nv, nx - hx * nv))
            xs, vs = torch.cat([xs[top], nx])[:starts], torch.cat([vs[top], nv])[:starts]
            scale *= 0.5
    return Attack(best[0], best[1], stages, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------
# Exact Lipschitz constant of tiny ReLU networks
# ----------------------------------------------------------------------------------------------


@dataclass
class Exact:
    lower: float  # max ||J|| over pieces confirmed at a witness point (a true lower bound on Lip)
    upper: float  # max over confirmed and LP-ambiguous pieces (>= Lip)
    pieces: int  # confirmed full-dimensional pieces
    ambiguous: int
    lps: int  # linear programs solved
    seconds: float
    witness: list[float] | None = None  # a point inside the steepest confirmed piece


MARGIN = 1e-9  # a neuron counts as strictly active/inactive beyond this normalised margin


def exact_relu_lipschitz(weights: list[np.ndarray], biases: list[np.ndarray], samples: int = 16000,
                         seed: int = 0) -> Exact:
    """Exact global L2 Lipschitz constant of x -> W_l relu(... relu(W_0 x + b_0) ...) + b_l.

    Depth-first over neurons (layer by layer); a node is a partial activation pattern, with the
    affine pre-activation of the current layer known as a function of x. See the module docstring.
    """
    from scipy.optimize import linprog

    t0 = time.perf_counter()
    weights = [np.asarray(w, dtype=np.float64) for w in weights]
    biases = [np.asarray(b, dtype=np.float64).reshape(-1) for b in biases]
    n_in = weights[0].shape[1]
    hidden = len(weights) - 1
    rng = np.random.default_rng(seed)
    scales = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)
    pts = np.concatenate([rng.standard_normal((samples // len(scales), n_in)) * s for s in scales])
    stats = {"lps": 0, "pieces": 0, "ambiguous": 0}
    best = {"lower": 0.0, "upper": 0.0, "x": None}

    def recurse(layer: int, M: np.ndarray, m: np.ndarray, pattern: list[np.ndarray], i: int,
                cons_A: list, cons_b: list, cons_norm: list, P: np.ndarray, ambiguous: bool) -> None:
        # M x + m: pre-activation of ``layer``; pattern: fixed 0/1 vectors of earlier layers plus
        # the first ``i`` neurons of this one; P: sample points realising the partial pattern.
        if layer == hidden:
            J = M  # the output map on this piece is M x + m
            norm = float(np.linalg.norm(J, 2)) if J.size else 0.0
            if ambiguous:
                stats["ambiguous"] += 1
            else:
                stats["pieces"] += 1
                if norm > best["lower"]:
                    best["lower"], best["x"] = norm, P[0].tolist()
            best["upper"] = max(best["upper"], norm)
            return
        if i == len(m):
            d = pattern[-1]
            W, b = weights[layer + 1], biases[layer + 1]
            recurse(layer + 1, W @ (d[:, None] * M), W @ (d * m) + b, pattern + [np.zeros(W.shape[0])], 0,
                    cons_A, cons_b, cons_norm, P, ambiguous)
            return
        a, c = M[i], m[i]
        na = float(np.linalg.norm(a))
        for active in (1.0, 0.0):
            sign = 1.0 if active else -1.0
            new_pattern = pattern[:-1] + [pattern[-1].copy()]
            new_pattern[-1][i] = active
            if na == 0.0:  # constant pre-activation: the pattern is decided, no region constraint
                if (c > 0 and active) or (c < 0 and not active) or (c == 0 and not active):
                    recurse(layer, M, m, new_pattern, i + 1, cons_A, cons_b, cons_norm, P, ambiguous)
                continue
            A2, b2, n2 = cons_A + [-sign * a], cons_b + [sign * c], cons_norm + [na]
            # sign * (a x + c) >= margin * ||a||  <=>  -sign a x <= sign c - margin ||a||
            Q = P[sign * (P @ a + c) > MARGIN * na] if len(P) else P
            if len(Q):
                recurse(layer, M, m, new_pattern, i + 1, A2, b2, n2, Q, ambiguous)
                continue
            # no sample realises it: maximise the margin t over x (LP)
            A = np.hstack([np.array(A2), np.array(n2)[:, None]])
            stats["lps"] += 1
            res = linprog(-np.eye(n_in + 1)[-1], A_ub=A, b_ub=np.array(b2),
                          bounds=[(None, None)] * n_in + [(None, 1.0)], method="highs")
            if res.status != 0:
                continue
            t = -res.fun
            if t < -MARGIN:
                continue  # empty (the constraints are violated everywhere by a margin)
            xw = res.x[:n_in][None]
            ok = t > MARGIN and bool(np.all(np.array(A2) @ xw[0] < np.array(b2) - 0.5 * MARGIN * np.array(n2)))
            recurse(layer, M, m, new_pattern, i + 1, A2, b2, n2, xw if ok else xw[:0], ambiguous or not ok)

    if hidden == 0:
        norm = float(np.linalg.norm(weights[0], 2))
        return Exact(norm, norm, 1, 0, 0, time.perf_counter() - t0)
    recurse(0, weights[0], biases[0], [np.zeros(weights[0].shape[0])], 0, [], [], [], pts, False)
    return Exact(best["lower"], best["upper"], stats["pieces"], stats["ambiguous"], stats["lps"],
                 time.perf_counter() - t0, best["x"])


def _confirm_piece_values(weights, biases, x: np.ndarray) -> float:
    """||J(x)|| at a point, computed by running the network (used by tests of the oracle)."""
    h = x
    J = np.eye(len(x))
    for k, (w, b) in enumerate(zip(weights, biases)):
        z = w @ h + b
        J = w @ J
        if k < len(weights) - 1:
            d = (z > 0).astype(np.float64)
            h = d * z
            J = d[:, None] * J
    return float(np.linalg.norm(J, 2))


# ----------------------------------------------------------------------------------------------
# One network
# ----------------------------------------------------------------------------------------------


class NetworkTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float | None):
    """Raise NetworkTimeout after ``seconds`` (SIGALRM; main thread only, no-op elsewhere)."""
    if not seconds or not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum, frame):
        raise NetworkTimeout(f"network took longer than {seconds:g} s")

    try:
        old = signal.signal(signal.SIGALRM, handler)
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def onnx_op_types(path) -> list[str]:
    import onnx

    return sorted({n.op_type for n in onnx.load(str(path)).graph.node})


def check_network(seed: int, workdir, *, family: str | None = None, lower_starts: int = 4,
                  lower_budget_s: float = 0.5, attack_budget_s: float = 3.0, timeout_s: float | None = 120.0,
                  keep_onnx: bool = False) -> dict:
    """Build, export, certify (every applicable method), attack and compare one random network.

    Returns a JSON-serialisable record; ``record["violations"]`` lists every soundness failure
    (empty when all is well), ``record["order_issues"]`` the violated method orderings.
    """
    from lipverify.certify import CertifyOptions, certify
    from lipverify.errors import LipverifyError, SoundnessError

    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 11])
    if family == "adversarial" or family is None and rng.random() < ADVERSARIAL_SHARE:
        from lipverify.adversarial import check_case

        with time_limit(timeout_s):
            return check_case(seed, workdir)
    net = random_network(seed, family)
    fold = bool(rng.random() < 0.5)
    output = None
    out_dim = _out_shape(net.module, net.input_shape)[0]
    if out_dim > 1 and rng.random() < 0.15:
        output = int(rng.integers(0, out_dim))
    rec: dict = {"seed": seed, "family": net.family, "input_shape": list(net.input_shape), "ops": net.ops,
                 "exporter_folded_bn": fold and net.has_bn, "output": output, "violations": [], "order_issues": []}
    path = Path(workdir) / f"net_{seed}.onnx"
    tol = FOLDED_BN_TOL if (fold and net.has_bn) else SOUND_TOL
    rec["tolerance"] = tol
    try:
        with time_limit(timeout_s):
            export_onnx(net.module, net.input_shape, path, fold=fold)
            rec["onnx_ops"] = onnx_op_types(path)
            opts = CertifyOptions(method="all", seed=seed, output=output, lower_starts=lower_starts,
                                  lower_budget_s=lower_budget_s,
                                  method_options={"layerwise_steps": int(rng.choice([20, 60, 150]))})
            try:
                cert = certify(path, opts)
            except SoundnessError as exc:
                # lipverify refused (exit 3). Its own lower bound above a certified bound is a real
                # violation; a method's witness failing the independent verifier is a method bug
                # that was caught (or a verifier false alarm). Either way: retry method by method
                # so that the other methods are still compared.
                rec["status"] = "soundness_error"
                rec["message"] = str(exc)
                if "lower bound" in str(exc):
                    rec["violations"].append(f"lipverify raised SoundnessError: {exc}")
                cert = _certify_each(path, opts, rec)
            except LipverifyError as exc:
                rec["status"] = "refused"
                rec["message"] = str(exc)
                cert = None
            att = attack(net.module, net.input_shape, seed=seed, output=output, budget_s=attack_budget_s)
    except NetworkTimeout as exc:
        rec["status"] = "timeout"
        rec["message"] = str(exc)
        rec["seconds"] = time.perf_counter() - t0
        return _finish(rec, path, keep_onnx)
    except Exception as exc:  # a crash inside lipverify (or the exporter) is a finding too
        rec["status"] = "crash"
        rec["message"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc()[-4000:]
        rec["seconds"] = time.perf_counter() - t0
        return _finish(rec, path, keep_onnx)
    rec["attack"] = att.value
    rec["attack_how"] = att.how
    rec["attack_stages"] = att.stages
    if cert is not None:
        rec.setdefault("status", "certified")
        bounds = dict(cert["bounds"])
        rec["bounds"] = bounds
        rec["certify_lower"] = cert["lower_bound"]
        rec["self_check_diff"] = cert["self_check"]["max_abs_diff"]
        rec["timings"] = {k: round(v, 4) for k, v in cert["timings"].items()}
        rec["method_seconds"] = {n: round(m["seconds"], 4) for n, m in cert["methods"].items()}
        rec["ir_ops"] = sorted({l["op"].split("(")[0].split(" ")[0] for l in cert["layers"]})
        for name, value in bounds.items():
            if value < att.value * (1 - tol):
                rec["violations"].append(f"{name} certified {value!r} < attack lower bound {att.value!r} "
                                         f"(found by {att.how})")
        for a, b in ORDERINGS:
            if a in bounds and b in bounds and bounds[a] > bounds[b] * (1 + ORDER_TOL):
                rec["order_issues"].append(f"{a} {bounds[a]!r} > {b} {bounds[b]!r}")
        if att.value > 0:
            rec["min_ratio"] = min(bounds.values()) / att.value
            rec["best_ratio"] = rec["min_ratio"]
            rec["ratios"] = {n: v / att.value for n, v in bounds.items()}
    if net.dense_weights is not None and output is None:
        ex = exact_relu_lipschitz(net.dense_weights, net.dense_biases, seed=seed)
        rec["exact"] = asdict(ex)
        if att.value > ex.upper * (1 + 1e-9) + 1e-12:
            rec["violations"].append(f"attack {att.value!r} above the exact Lipschitz constant {ex.upper!r}: "
                                     "the oracle or the attack is wrong")
        if cert is not None:
            for name, value in rec["bounds"].items():
                if value < ex.lower * (1 - SOUND_TOL):
                    rec["violations"].append(f"{name} certified {value!r} < exact Lipschitz constant {ex.lower!r}")
            if ex.lower > 0:
                rec["exact_ratios"] = {n: v / ex.lower for n, v in rec["bounds"].items()}
                rec["attack_vs_exact"] = att.value / ex.lower
    rec["seconds"] = time.perf_counter() - t0
    return _finish(rec, path, keep_onnx)


def _certify_each(path, opts, rec: dict) -> dict | None:
    """Certify with each applicable method alone; a merged certificate of those that pass."""
    from lipverify.bounds import METHODS
    from lipverify.certify import certify
    from lipverify.errors import LipverifyError, SoundnessError

    merged = None
    rec["method_errors"] = {}
    for name in list(METHODS):
        try:
            cert = certify(path, dataclasses_replace(opts, method=name))
        except SoundnessError as exc:
            rec["method_errors"][name] = f"SoundnessError: {exc}"
            if "lower bound" in str(exc):
                rec["violations"].append(f"lipverify raised SoundnessError ({name}): {exc}")
            continue
        except LipverifyError:  # not applicable
            continue
        if merged is None:
            merged = cert
        else:
            merged["bounds"].update(cert["bounds"])
    return merged


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def _finish(rec: dict, path: Path, keep_onnx: bool) -> dict:
    if rec["violations"] or rec.get("status") in ("crash", "timeout", "soundness_error"):
        keep_onnx = True
    if keep_onnx and path.exists():
        rec["onnx"] = str(path)
    elif path.exists():
        path.unlink()
    return rec


def refusal_cause(message: str) -> str:
    """A short label for why lipverify refused a file: the op and the first words of the reason."""
    import re

    m = re.search(r"unsupported operation '([^']+)' at node '[^']*': (.*)", message)
    if m:
        return f"{m.group(1)}: " + " ".join(m.group(2).split()[:6])
    return " ".join(message.split()[:8])


def summarize(records: list[dict]) -> dict:
    """Counts, ops covered, violations and ratios over campaign records."""
    status: dict[str, int] = {}
    ops: set[str] = set()
    onnx_ops: set[str] = set()
    acts: set[str] = set()
    methods: dict[str, int] = {}
    worst_min, worst_max = math.inf, 0.0
    exact_worst = math.inf
    seconds = 0.0
    for r in records:
        status[r.get("status", "?")] = status.get(r.get("status", "?"), 0) + 1
        for o in r.get("ops", []):
            ops.add(o.split("(")[0])
            if o.split("(")[0] in ACTIVATIONS:
                acts.add(o)
        onnx_ops.update(r.get("onnx_ops", []))
        for n in r.get("bounds", {}):
            methods[n] = methods.get(n, 0) + 1
        if "min_ratio" in r:
            worst_min = min(worst_min, r["min_ratio"])
            worst_max = max(worst_max, max(r["ratios"].values()))
        for v in r.get("exact_ratios", {}).values():
            exact_worst = min(exact_worst, v)
        seconds += r.get("seconds", 0.0)
    causes: dict[str, int] = {}
    families: dict[str, int] = {}
    for r in records:
        families[r.get("family", "?")] = families.get(r.get("family", "?"), 0) + 1
        if r.get("status") == "refused":
            cause = refusal_cause(r.get("message", ""))
            causes[cause] = causes.get(cause, 0) + 1
    return {
        "networks": len(records),
        "families": dict(sorted(families.items())),
        "refusals_by_cause": dict(sorted(causes.items(), key=lambda kv: -kv[1])),
        "status": status,
        "violations": sum(len(r.get("violations", [])) > 0 for r in records),
        "exit3_refusals": sum(r.get("status") == "soundness_error" for r in records),
        "order_issues": sum(len(r.get("order_issues", [])) > 0 for r in records),
        "exact_checked": sum("exact" in r for r in records),
        "methods": methods,
        "ops_covered": sorted(ops),
        "activations_covered": sorted(acts),
        "onnx_ops_covered": sorted(onnx_ops),
        "min_certified_over_attack": worst_min if worst_min < math.inf else None,
        "max_certified_over_attack": worst_max or None,
        "min_certified_over_exact": exact_worst if exact_worst < math.inf else None,
        "network_seconds": seconds,
    }


__all__ = ["Attack", "Exact", "RandomNet", "attack", "check_network", "exact_relu_lipschitz", "export_onnx",
           "load_all_methods", "random_network", "summarize", "time_limit"]
