"""``lip-loop``: ADMM on the admissibility set of the certificate (LipSDP, or layerwise scalings)."""

from __future__ import annotations

import math

import torch

from lipverify.finetune.base import Method
from lipverify.finetune.certificates import make_certificate


class LipLoop(Method):
    """ADMM on {weights whose certificate meets the target}.

    Variables: the weights W (trained by the optimizer), the projected weights Wbar and the scaled
    dual U. Each step adds the augmented-Lagrangian pull (rho/2) sum_k ||W_k - Wbar_k + U_k||^2 /
    ||W_k^0||^2 to the loss; every ``admm_every`` steps: Wbar <- Proj(W + U), U <- U + W - Wbar.

    The certificate (certificates.py) is the one ``certify`` reports: LipSDP on dense chains (its
    loop-transformed form certifies exactly the same (rho, T)), layerwise scalings D on everything
    else (convolutions, pooling, residual blocks). Its variables (T, or D) are recomputed once
    per epoch at the current consensus point. In between, the projection reuses them: ``value``
    bounds V = W + U for the fixed variables; when it exceeds the target, every layer of V is
    scaled by c = (target / L)^(1/n) with the variables rescaled to match (both bounds are
    homogeneous of degree n under this change of variables), so the result meets the target, and
    it is re-evaluated. At the end the trained W is made feasible the same way, with the
    variables recomputed the way ``certify`` computes them and the value certified, and exported.
    """

    name = "lip-loop"
    description = "ADMM on the certificate's LMI (LipSDP on dense chains, layerwise scalings otherwise)"
    default_loss = "margin"

    def __init__(self, tg, target, opts, seed):
        super().__init__(tg, target, opts, seed)
        self.cert = make_certificate(tg, seed)
        self.rho = float(opts.rho)
        self.every = max(1, int(opts.admm_every))
        self.scale = [float(n.op.weight.detach().pow(2).sum()) or 1.0 for n in self.layers]
        self.bscale = [float(n.op.bias.detach().pow(2).sum()) or 1.0 if n.op.bias is not None else 1.0
                       for n in self.layers]
        self.certified = math.inf
        self.gamma = 1.0  # certificate / product of the layer estimates, at the last refresh
        self.U = [torch.zeros_like(n.op.weight) for n in self.layers]
        self.Ub = [torch.zeros_like(n.op.bias) if n.op.bias is not None else None for n in self.layers]
        self._refresh()
        # feasible warm start: scale the weights (biases cumulatively, see Method.warm_start) so
        # that the certificate meets the target; then (W, b) = (Wbar, bbar) and U = 0
        self._project()
        self.warm_start([self.last_c] * len(self.layers))
        self.Wbar = [n.op.weight.detach().clone() for n in self.layers]
        self.bbar = [n.op.bias.detach().clone() if n.op.bias is not None else None for n in self.layers]

    def _consensus(self) -> list[torch.Tensor]:
        return [(n.op.weight.detach() + u).clone() for n, u in zip(self.layers, self.U)]

    def _refresh(self, final: bool = False) -> None:
        """New certificate variables at the current consensus point W + U, and the ratio gamma of
        W's certificate to the product of its layer estimates (for ``loss_scale``)."""
        self.cert.refresh(self._consensus(), final)
        weights = [n.op.weight.detach() for n in self.layers]
        tight = self.cert.value(weights)
        product = self.const * math.prod(p.run(3) for p in self.norms)
        if math.isfinite(tight) and product > 0:
            self.gamma = min(1.0, tight / product)

    def loss_scale(self):
        """The iterate W leaves the certified set between projections (the pull towards Wbar is
        soft), often by 1.5x early on; a margin loss measured against the target would then train
        margins that the final, feasible weights do not have. So margins are measured against
        gamma * prod_k ||A_k v_k|| (the tracked power vectors; differentiable in W), the current
        estimate of W's certified L, whenever it is above the target."""
        sig = [p.apply(p.v).norm() for p in self.norms]
        est = self.gamma * self.const * torch.stack(sig).prod()
        return torch.clamp(est, min=self.target)

    def _project(self, final: bool = False) -> None:
        """Wbar, bbar <- a certified point near (W + U, b + Ub): the weights scaled by c each,
        the biases by c^(k+1) (hidden states scale consistently, the argmax is kept for ReLU).
        ``final``: with the certified value (the estimate steers in between)."""
        V = self._consensus()
        n = len(V)
        # the final point keeps 0.1 % of margin: certify re-extracts the graph from the exported
        # file and optimizes its own scalings, which can land a hair above ours
        goal = self.target * (1 - 1e-3) if final else self.target
        total = 1.0
        for _ in range(6):
            L = self.cert.value(V, certified=final)
            if L <= goal:
                break
            if not math.isfinite(L):  # the variables no longer certify anything: refresh them here
                self.cert.refresh(V)
                continue
            c = (goal / L * (1 - 1e-4)) ** (1.0 / n)
            total *= c
            V = [v * c for v in V]
            self.cert.rescale(c)
            if not final:  # homogeneity: the scaled point's value is c^n L; no second evaluation
                L = L * c ** n
                break
        else:
            raise RuntimeError("lip-loop: the projection did not reach the target")  # pragma: no cover
        self.bbar = [None if node.op.bias is None else (node.op.bias.detach() + ub) * total ** (k + 1)
                     for k, (node, ub) in enumerate(zip(self.layers, self.Ub))]
        self.Wbar, self.certified, self.last_c = V, L, total

    def penalty(self, step):
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for k, node in enumerate(self.layers):
            total = total + 0.5 * self.rho * (node.op.weight - self.Wbar[k] + self.U[k]).pow(2).sum() / self.scale[k]
            if node.op.bias is not None:
                total = total + 0.5 * self.rho * (node.op.bias - self.bbar[k] + self.Ub[k]).pow(2).sum() / self.bscale[k]
        return total

    def after_step(self, step):
        if (step + 1) % self.every == 0:
            for p in self.norms:
                p.run(1)
            self._project()
            for k, node in enumerate(self.layers):
                self.U[k] = self.U[k] + node.op.weight.detach() - self.Wbar[k]
                if node.op.bias is not None:
                    self.Ub[k] = self.Ub[k] + node.op.bias.detach() - self.bbar[k]

    def end_epoch(self, epoch):
        self._refresh()
        self.rho *= float(self.opts.rho_growth)

    def finalize(self):
        """Export the projection of the trained (W, b) itself (U = 0): Wbar's biases were scaled
        with its weights (``_project``), so (Wbar, bbar) computes what W computes, up to the output
        scale."""
        self.U = [torch.zeros_like(u) for u in self.U]
        self.Ub = [None if u is None else torch.zeros_like(u) for u in self.Ub]
        self._refresh(final=True)
        self._project(final=True)
        with torch.no_grad():
            for node, w, b in zip(self.layers, self.Wbar, self.bbar):
                node.op.weight.copy_(w)
                if b is not None:
                    node.op.bias.copy_(b)

    def estimate(self):
        return self.certified, f"{self.cert.kind}(W̄)"

    def state_dict(self):
        d = super().state_dict()
        d.update({"Ub": list(self.Ub), "bbar": list(self.bbar), "last_c": self.last_c,
                  "U": [u.clone() for u in self.U], "Wbar": [w.clone() for w in self.Wbar],
                  "cert": self.cert.state_dict(), "rho": self.rho, "certified": self.certified})
        return d

    def load_state_dict(self, state):
        super().load_state_dict(state)
        move = lambda ts: [None if t is None else t.to(self.device) for t in ts]  # noqa: E731
        self.U, self.Wbar = move(state["U"]), move(state["Wbar"])
        self.Ub, self.bbar = move(state["Ub"]), move(state["bbar"])
        self.last_c = float(state["last_c"])
        self.cert.load_state_dict(state["cert"])
        self.rho = float(state["rho"])
        self.certified = float(state["certified"])
