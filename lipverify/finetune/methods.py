"""Lipschitz-constrained training methods: ``rslmi`` (default), ``lip-loop`` (ADMM) and ``project``.

All three act on the trainable layers of a :class:`~lipverify.finetune.train.TrainableGraph`
(every Dense and Conv node of the lipverify IR, BatchNorm already folded into them) and aim at
``L_train = target / prod(constant factors)``, the constant factors being the certified factors of
the nodes that are not trained (activations, pooling, fixed scalings). None of them certifies
anything: the run always ends with ``lipverify.certify.certify`` on the exported file and, when
needed, an exact final correction (see train.py).

Interface (one object per run): ``parameters()`` extra trainable tensors, ``penalty(step)`` added to
the task loss, ``after_step(step)`` (projections, ADMM updates), ``end_epoch(epoch)``,
``estimate()`` -> (current L estimate, what kind), ``finalize()`` before export, and
``state_dict()`` / ``load_state_dict()`` for checkpoints (resume must reproduce a run exactly).

Randomness (sketches) never comes from a global generator: each step draws from a generator seeded
with (seed, step, layer), so a resumed run redraws exactly the sketches of the uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from lipverify.errors import UserInputError
from lipverify.ops.activation import Activation
from lipverify.ops.dense import Dense
from lipverify.ops.shape import Reshape


def _ata(op, v: torch.Tensor) -> torch.Tensor:
    """A^T A v for the linear part of ``op`` (Dense or Conv), the adjoint through autograd."""
    x = v.detach().requires_grad_(True)
    with torch.enable_grad():
        y = op.apply(x)
        (g,) = torch.autograd.grad(y, x, grad_outputs=y.detach())
    return g.detach()


class _Power:
    """Persistent power iteration on A^T A for one layer: a lower estimate of ||A||_2 that tracks
    the weights as they move (a few iterations per step suffice after the first call)."""

    def __init__(self, op, in_shape, seed: int):
        g = torch.Generator().manual_seed(seed)
        v = torch.randn((1,) + tuple(in_shape), generator=g, dtype=torch.float32)
        self.op = op
        self.v = v / v.norm()
        self.sigma = 0.0

    def run(self, iters: int) -> float:
        with torch.no_grad():
            for _ in range(iters):
                w = _ata(self.op, self.v)
                n = float(w.norm())
                if n == 0.0:
                    self.sigma = 0.0
                    return 0.0
                self.sigma = math.sqrt(max(float((w * self.v).sum()), 0.0))
                self.v = w / n
        return self.sigma


class Method:
    name = "plain"
    description = "no Lipschitz term (baseline: the final correction alone meets the target)"

    def __init__(self, tg, target: float, opts, seed: int):
        self.tg = tg
        self.layers = tg.trainable  # list of IR nodes whose op weights are nn.Parameters
        self.target = float(target)  # the whole network's target L
        self.const = tg.const_factor
        self.L_train = self.target / self.const  # what the trainable layers' product must reach
        self.opts = opts
        self.seed = int(seed)
        self.powers = [_Power(n.op, tg.graph.in_shape(n), seed * 7919 + i) for i, n in enumerate(self.layers)]
        for p in self.powers:
            p.run(30)

    def warm_start(self, factors: list[float]) -> None:
        """Scale layer k's weight by c_k and its bias by C_k = prod_{j<=k} c_j (trainable layers in
        graph order). On a chain of positively homogeneous activations (ReLU, LeakyReLU) this
        multiplies every hidden state by C_k and the output by C_n: the predicted class does not
        change, and the product of layer norms drops by prod c_k. So the run starts at a point
        that meets the layer budgets with the original accuracy, instead of starting infeasible."""
        cum = 1.0
        with torch.no_grad():
            for node, c in zip(self.layers, factors):
                cum *= c
                node.op.weight.mul_(c)
                if node.op.bias is not None:
                    node.op.bias.mul_(cum)
        for p, c in zip(self.powers, factors):
            p.sigma *= c

    # -- hooks -------------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return []

    def penalty(self, step: int) -> torch.Tensor | None:
        return None

    def after_step(self, step: int) -> None:
        pass

    def end_epoch(self, epoch: int) -> None:
        pass

    def finalize(self) -> None:
        pass

    def estimate(self) -> tuple[float, str]:
        sig = [p.run(5) for p in self.powers]
        return self.const * float(np.prod(sig)), "est."

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"power_v": [p.v.clone() for p in self.powers]}

    def load_state_dict(self, state: dict) -> None:
        for p, v in zip(self.powers, state["power_v"]):
            p.v = v.clone()


class RSLMI(Method):
    """Penalty on the sketched layer LMIs  tau_k I >= W_k^T W_k  under  prod_k sqrt(tau_k) <= L_train.

    loss + sum_k [ w_tau * log tau_k + alpha * (log lambda_max(S^T W_k^T W_k S) - log tau_k)_+ ]

    - The sketch S (n_k x m, orthonormal columns, so lambda_max(S^T W^T W S) <= ||W||^2 always) is
      redrawn every step from a seeded generator. Its first column is the layer's persistent
      power-iteration vector: a purely random m-dimensional sketch of an n-dimensional layer sees
      only about m/n of the top singular direction, so the penalty would barely bite; with the
      tracked top direction in it, the sketched value follows ||W_k||^2 closely while the other
      m-1 random directions catch the next singular directions as they rise.
    - tau_k = exp(s_k) are trained with the weights. The product constraint is the half-space
      sum_k s_k <= 2 log L_train, enforced exactly by Euclidean projection of s after each step
      (instead of a log-barrier: exact, no barrier weight to tune). With it binding, the hinge
      gradients move the budget between layers: a layer whose norm the task loss wants larger
      gets a larger tau_k, paid for by the others.
    - The hinge is in logarithms (relative violation), so alpha does not depend on the scale of
      the weights; ``alpha_growth`` > 1 multiplies alpha every epoch (an exact-penalty
      continuation). Measured on the digits MLP, a constant small alpha (0.3) gave better
      certified accuracy than a growing one: the end point may sit a little above the budgets and
      the final correction (an output rescale, free in accuracy and certified radii) absorbs it.
    """

    name = "rslmi"
    description = "sketched layer-LMI penalty with trained per-layer budgets tau_k (default)"

    def __init__(self, tg, target, opts, seed):
        super().__init__(tg, target, opts, seed)
        s0 = torch.tensor([2.0 * math.log(max(p.sigma, 1e-12)) for p in self.powers], dtype=torch.float32)
        if opts.warm_start == "clip":  # equal budgets where the layers are above them
            s0 = s0.clamp(max=2.0 * math.log(self.L_train) / len(self.powers))
        self.s = nn.Parameter(s0)
        self._project_s()
        radii = [math.exp(float(sk) / 2) for sk in self.s.detach()]
        if opts.warm_start == "clip":
            clip_layers(self.layers, self.powers, radii, exact=True)
        else:
            self.warm_start([min(1.0, r / max(p.sigma, 1e-30)) for r, p in zip(radii, self.powers)])
        self.alpha = float(opts.alpha)
        self.last_lam = [p.sigma ** 2 for p in self.powers]

    def parameters(self):
        return [self.s]

    def _project_s(self) -> None:
        with torch.no_grad():
            excess = float(self.s.sum()) - 2.0 * math.log(self.L_train)
            if excess > 0:
                self.s -= excess / self.s.numel()

    def _sketch(self, k: int, step: int) -> torch.Tensor:
        node = self.layers[k]
        in_shape = tuple(self.tg.graph.in_shape(node))
        n = int(np.prod(in_shape))
        m = max(1, min(int(self.opts.sketch_dim), n))
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 131 + k)
        cols = [self.powers[k].v.reshape(n, 1)]
        if m > 1:
            cols.append(torch.randn(n, m - 1, generator=g, dtype=torch.float32))
        q, _ = torch.linalg.qr(torch.cat(cols, dim=1))
        return q.T.reshape((q.shape[1],) + in_shape)

    def penalty(self, step):
        total = torch.zeros((), dtype=torch.float32)
        for k, node in enumerate(self.layers):
            self.powers[k].run(1)
            sk = self._sketch(k, step)
            y = node.op.apply(sk).reshape(sk.shape[0], -1)  # rows: A q_i
            lam = torch.linalg.eigvalsh(y @ y.T)[-1].clamp_min(1e-30)
            self.last_lam[k] = float(lam.detach())
            total = total + self.alpha * torch.relu(torch.log(lam) - self.s[k]) + self.opts.tau_weight * self.s[k]
        return total

    def after_step(self, step):
        self._project_s()

    def end_epoch(self, epoch):
        self.alpha *= float(self.opts.alpha_growth)

    def state_dict(self):
        d = super().state_dict()
        d.update({"s": self.s.detach().clone(), "alpha": self.alpha})
        return d

    def load_state_dict(self, state):
        super().load_state_dict(state)
        with torch.no_grad():
            self.s.copy_(state["s"])
        self.alpha = float(state["alpha"])


def clip_layers(layers, powers, radii, exact: bool) -> None:
    """Put layer k in the spectral-norm ball of radius radii[k]: Dense by an exact SVD clip (the
    Euclidean projection), Conv by scaling the kernel along the ray with the tracked norm."""
    with torch.no_grad():
        for node, p, r in zip(layers, powers, radii):
            w = node.op.weight
            if isinstance(node.op, Dense):
                u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
                if float(s[0]) > r:
                    w.copy_((u * s.clamp(max=r)) @ vh)
            else:
                sigma = p.run(30 if exact else 2)
                if sigma > r:
                    w.mul_(r / sigma)
                    p.sigma = r


class Project(Method):
    """Baseline: after every step put each layer back in the spectral-norm ball of radius
    r = L_train^(1/n). Dense: exact SVD clip (the Euclidean projection onto the ball). Conv: the
    operator's singular vectors are not at hand, so the kernel is scaled back along the ray by the
    tracked power-iteration norm (a lower estimate; the final certification catches any excess)."""

    name = "project"
    description = "baseline: spectral-norm ball projection of every layer after each step"

    def __init__(self, tg, target, opts, seed):
        super().__init__(tg, target, opts, seed)
        self.radius = self.L_train ** (1.0 / max(len(self.layers), 1))
        self.after_step(-1)

    def after_step(self, step):
        clip_layers(self.layers, self.powers, [self.radius] * len(self.layers), exact=step < 0)


def dense_chain(tg) -> tuple[list, list[tuple[float, float]]]:
    """(dense nodes, per-hidden-layer slopes) when the IR is Dense-activation-...-Dense (Reshape
    allowed before the first Dense): the networks LipSDP (and so lip-loop) handles."""
    g = tg.graph
    if not g.is_chain():
        raise UserInputError("--method lip-loop needs a chain of dense layers (no residual branches); use rslmi")
    dense, slopes, pending = [], [], None
    for n in g.nodes:
        if isinstance(n.op, Dense):
            if len(g.in_shape(n)) != 1:
                raise UserInputError("--method lip-loop: a dense layer acts on a non-flat tensor; use rslmi")
            if dense and pending is None:
                raise UserInputError("--method lip-loop: two dense layers without an activation between them")
            if pending is not None:
                slopes.append(pending)
            dense.append(n)
            pending = None
        elif isinstance(n.op, Activation):
            if not dense or pending is not None:
                raise UserInputError("--method lip-loop: activations must sit between dense layers")
            pending = tuple(float(v) for v in n.op.slopes)
        elif isinstance(n.op, Reshape) and not dense:
            continue
        else:
            raise UserInputError(f"--method lip-loop handles dense chains only (found {n.op.describe()}); use rslmi")
    if pending is not None or len(dense) < 2:
        raise UserInputError("--method lip-loop needs at least one hidden layer and a dense output layer")
    return dense, slopes


def _closed_form_T(weights, slopes) -> list[np.ndarray]:
    """LipSDP certificate variables from lipsdp_core's closed-form strictly feasible start."""
    from lipverify.bounds.lipsdp_core import initial_T

    return [np.asarray(t, dtype=np.float64).reshape(-1) for t in initial_T(weights, slopes)]


class LipLoop(Method):
    """ADMM on the LipSDP admissibility set (dense chains).

    Variables: the weights W (trained by the optimizer), the projected weights Wbar and the scaled
    dual U. Each step adds the augmented-Lagrangian pull (rho/2) sum_k ||W_k - Wbar_k + U_k||^2 /
    ||W_k^0||^2 to the loss; every ``admm_every`` steps: Wbar <- Proj(W + U), U <- U + W - Wbar.

    The projection: the certificate step (LipSDP with the slopes of each layer; its
    loop-transformed form certifies exactly the same (rho, T)) runs once per epoch at the current
    point and gives the certificate variables T (see ``_sdp_step``). In between, a verified
    projection reuses T: the smallest rho for that T (``repair``: closed-form elimination plus a
    Cholesky check) certifies V = W + U; when sqrt(rho) exceeds the target, every layer of V is
    scaled by c = (target / L)^(1/n) with T_k rescaled by c^(2(l-k)), which certifies exactly
    c^n times the bound (the LMI is homogeneous under this change of variables), and the result
    is re-verified. Wbar is thus always a point whose LipSDP certificate meets the target; at the
    end its weights (with the trained biases) are exported.
    """

    name = "lip-loop"
    description = "ADMM on the LipSDP LMI (dense chains): weight steps, verified LMI projection, dual update"

    def __init__(self, tg, target, opts, seed):
        super().__init__(tg, target, opts, seed)
        self.dense, self.slopes = dense_chain(tg)
        if any(n not in self.dense for n in self.layers):
            raise UserInputError("--method lip-loop: the network has trainable layers other than dense ones; use rslmi")
        self.rho = float(opts.rho)
        self.every = max(1, int(opts.admm_every))
        self.scale = [float(n.op.weight.detach().pow(2).sum()) or 1.0 for n in self.dense]
        self.bscale = [float(n.op.bias.detach().pow(2).sum()) or 1.0 if n.op.bias is not None else 1.0
                       for n in self.dense]
        self.T = None
        self.certified = float("inf")
        self.U = [torch.zeros_like(n.op.weight) for n in self.dense]
        self.Ub = [torch.zeros_like(n.op.bias) if n.op.bias is not None else None for n in self.dense]
        self._sdp_step()
        # feasible warm start: scale the weights (biases cumulatively, see Method.warm_start) so
        # that LipSDP with the solved T certifies the target; then (W, b) = (Wbar, bbar) and U = 0
        self._project()
        self.warm_start([self.last_c] * len(self.dense))
        self.Wbar = [n.op.weight.detach().clone() for n in self.dense]
        self.bbar = [n.op.bias.detach().clone() if n.op.bias is not None else None for n in self.dense]

    def _weights(self, ws=None):
        ws = ws if ws is not None else [n.op.weight.detach() for n in self.dense]
        return [w.double().numpy() for w in ws]

    def _sdp_step(self) -> None:
        """Refresh the certificate variables T at the current consensus point W + U.

        T comes from lipsdp_core's closed-form backward elimination (a strictly feasible layer-
        uniform point, ECLipsE-like), not from the interior-point solver: the solver runs under a
        wall-clock budget, which would make a resumed run differ from an uninterrupted one, and
        on the digits MLP ``repair`` of this T certified the same bound as the full solve (68.81)
        in 0.1 s instead of 1-10 s. Soundness never depends on T: ``repair`` verifies every use.
        """
        ws = [(n.op.weight.detach() + u) for n, u in zip(self.dense, self.U)]
        self.T = _closed_form_T(self._weights(ws), self.slopes)

    def _project(self) -> None:
        """Wbar, bbar <- a LipSDP-verified point near (W + U, b + Ub): the weights scaled by c each,
        the biases by c^(k+1) (hidden states scale consistently, the argmax is kept for ReLU)."""
        from lipverify.bounds.lipsdp_core import repair

        V = [(n.op.weight.detach() + u).clone() for n, u in zip(self.dense, self.U)]
        T = [t.copy() for t in self.T]
        nl = len(V)
        total = 1.0
        for _ in range(6):
            rho = repair(self._weights(V), self.slopes, T)
            L = math.sqrt(rho) if math.isfinite(rho) else math.inf
            if L <= self.target:
                break
            if not math.isfinite(L):  # T no longer certifies anything: refresh it here
                T = _closed_form_T(self._weights(V), self.slopes)
                continue
            c = (self.target / L * (1 - 1e-4)) ** (1.0 / nl)
            total *= c
            V = [v * c for v in V]
            T = [t * c ** (2 * (nl - 1 - k)) for k, t in enumerate(T)]
        else:
            raise RuntimeError("lip-loop: the verified projection did not reach the target")  # pragma: no cover
        self.bbar = [None if n.op.bias is None else (n.op.bias.detach() + ub) * total ** (k + 1)
                     for k, (n, ub) in enumerate(zip(self.dense, self.Ub))]
        self.Wbar, self.T, self.certified, self.last_c = V, T, L, total

    def penalty(self, step):
        total = torch.zeros((), dtype=torch.float32)
        for k, n in enumerate(self.dense):
            total = total + 0.5 * self.rho * (n.op.weight - self.Wbar[k] + self.U[k]).pow(2).sum() / self.scale[k]
            if n.op.bias is not None:
                total = total + 0.5 * self.rho * (n.op.bias - self.bbar[k] + self.Ub[k]).pow(2).sum() / self.bscale[k]
        return total

    def after_step(self, step):
        if (step + 1) % self.every == 0:
            self._admm_update()

    def _admm_update(self):
        self._project()
        for k, n in enumerate(self.dense):
            self.U[k] = self.U[k] + n.op.weight.detach() - self.Wbar[k]
            if n.op.bias is not None:
                self.Ub[k] = self.Ub[k] + n.op.bias.detach() - self.bbar[k]

    def end_epoch(self, epoch):
        self._sdp_step()
        self.rho *= float(self.opts.rho_growth)

    def finalize(self):
        """Export the trained W (not Wbar: Wbar's weights were scaled without their biases), made
        LipSDP-feasible by the bias-aware scaling of ``warm_start`` when it is above the target."""
        self.U = [torch.zeros_like(u) for u in self.U]
        self.Ub = [None if u is None else torch.zeros_like(u) for u in self.Ub]
        self._sdp_step()
        self._project()
        self.warm_start([self.last_c] * len(self.dense))

    def estimate(self):
        return self.certified, "LipSDP(W̄)"

    def state_dict(self):
        d = super().state_dict()
        d.update({"Ub": [u for u in self.Ub], "bbar": [b for b in self.bbar], "last_c": self.last_c,
                  "U": [u.clone() for u in self.U], "Wbar": [w.clone() for w in self.Wbar],
                  "T": [torch.from_numpy(t.copy()) for t in self.T], "rho": self.rho, "certified": self.certified})
        return d

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.U = [u.clone() for u in state["U"]]
        self.Wbar = [w.clone() for w in state["Wbar"]]
        self.Ub = list(state["Ub"])
        self.bbar = list(state["bbar"])
        self.last_c = float(state["last_c"])
        self.T = [t.numpy().copy() for t in state["T"]]
        self.rho = float(state["rho"])
        self.certified = float(state["certified"])


METHODS = {"rslmi": RSLMI, "lip-loop": LipLoop, "project": Project, "plain": Method}


def make_method(name: str, tg, target: float, opts, seed: int) -> Method:
    if name not in METHODS:
        raise UserInputError(f"unknown --method {name!r}; choose one of rslmi, lip-loop, project")
    return METHODS[name](tg, target, opts, seed)
