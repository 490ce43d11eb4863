"""What every fine-tune method shares: the method interface, tracked layer norms, spectral clips.

A method acts on the trainable layers of a :class:`~lipverify.finetune.train.TrainableGraph`
(every Dense and Conv node of the lipverify IR, BatchNorm already folded into them) and aims at
``L_train = target / prod(constant factors)``, the constant factors being the certified factors of
the nodes that are not trained (activations, pooling, fixed scalings). No method certifies
anything: the run always ends with ``lipverify.certify.certify`` on the exported file and, when
needed, an exact final correction (see train.py).

Interface (one object per run): ``parameters()`` extra trainable tensors, ``penalty(step)`` added to
the task loss, ``after_step(step)`` (projections, ADMM updates), ``end_epoch(epoch)``,
``estimate()`` -> (current L estimate, what kind), ``finalize()`` before export, and
``state_dict()`` / ``load_state_dict()`` for checkpoints (resume must reproduce a run exactly).

Randomness (sketches) never comes from a global generator: each draw comes from a generator
seeded with (seed, step, layer), so a resumed run redraws exactly the sketches of the
uninterrupted one, and every data-parallel rank draws the same ones.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from lipverify.ops.dense import Dense


class LayerNorm:
    """Persistent power iteration on A^T A for one trainable layer: a lower estimate of ||A||_2
    that follows the weights as they move (one iteration per refresh suffices once converged).

    Dense layers iterate on the weight matrix itself (``W^T (W v)``, v of the input width): a
    Dense node acting on a (..., in) tensor is I ⊗ W, whose norm is ||W||_2. Convolutions use the
    exact adjoint (a transposed convolution)."""

    def __init__(self, node, in_shape, seed: int):
        self.op = node.op
        self.dense = isinstance(node.op, Dense)
        self.in_shape = (int(node.op.weight.shape[1]),) if self.dense else tuple(in_shape)
        g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same start on every device
        v = torch.randn((1,) + self.in_shape, generator=g, dtype=torch.float32).to(node.op.weight.device)
        self.v = v / v.norm()
        self.sigma = 0.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A x on a batch of inputs (differentiable in the weights)."""
        if self.dense:
            return x @ self.op.weight.T
        return self.op.apply(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return y @ self.op.weight
        from lipverify.norms.conv import conv_adjoint

        op = self.op
        return conv_adjoint(y, op.weight, self.in_shape, op.stride, op.pads, op.dilation, op.groups)

    def run(self, iters: int) -> float:
        with torch.no_grad():
            for _ in range(iters):
                w = self.adjoint(self.apply(self.v))
                n = float(w.norm())
                if n == 0.0:
                    self.sigma = 0.0
                    return 0.0
                self.sigma = math.sqrt(max(float((w * self.v).sum()), 0.0))
                self.v = w / n
        return self.sigma

    def certified(self) -> float:
        """A certified upper bound on ||A||_2 (exact SVD / conv norm routines, inflated)."""
        from lipverify.bounds.rslmi import certify_linear
        from lipverify.ops.conv import Conv

        w = self.op.weight.detach().double().cpu()
        if self.dense:
            return float(certify_linear(Dense(w), self.in_shape).upper)
        op = self.op
        return float(certify_linear(Conv(w, None, op.stride, op.pads, op.dilation, op.groups),
                                    self.in_shape, self.sigma).upper)


def clip_layers(layers, norms: list[LayerNorm], radii: list[float], exact: bool) -> None:
    """Put layer k in the spectral-norm ball of radius radii[k]: Dense by an exact SVD clip (the
    Euclidean projection), Conv by scaling the kernel along the ray, with its certified norm when
    ``exact`` (then the layer is in the ball for sure) or the tracked power estimate otherwise."""
    with torch.no_grad():
        for node, p, r in zip(layers, norms, radii):
            w = node.op.weight
            if isinstance(node.op, Dense):
                u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
                if float(s[0]) > r:
                    w.copy_((u * s.clamp(max=r)) @ vh)
            else:
                sigma = max(p.run(30), p.certified()) if exact else p.run(2)
                if sigma > r:
                    w.mul_(r / sigma)
                    p.sigma = r


class Method:
    """Base class and the ``plain`` method: no Lipschitz term (the final correction alone meets
    the target; the benchmark's timing baseline)."""

    name = "plain"
    description = "no Lipschitz term (baseline: the final correction alone meets the target)"
    default_loss = "ce"

    def __init__(self, tg, target: float, opts, seed: int):
        self.tg = tg
        self.device = tg.device
        self.layers = tg.trainable  # list of IR nodes whose op weights are nn.Parameters
        self.target = float(target)  # the whole network's target L
        self.const = tg.const_factor
        self.L_train = self.target / self.const  # what the trainable layers' product must reach
        self.opts = opts
        self.seed = int(seed)
        self.norms = [LayerNorm(n, tg.graph.in_shape(n), seed * 7919 + i) for i, n in enumerate(self.layers)]
        for p in self.norms:
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
        for p, c in zip(self.norms, factors):
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

    def loss_scale(self) -> torch.Tensor | float | None:
        """The Lipschitz constant the margin loss measures margins against (None: the target)."""
        return None

    def estimate(self) -> tuple[float, str]:
        sig = [p.run(5) for p in self.norms]
        return self.const * float(np.prod(sig)), "est."

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"power_v": [p.v.clone() for p in self.norms]}

    def load_state_dict(self, state: dict) -> None:
        for p, v in zip(self.norms, state["power_v"]):
            p.v = v.to(self.device)


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
        clip_layers(self.layers, self.norms, [self.radius] * len(self.layers), exact=step < 0)
