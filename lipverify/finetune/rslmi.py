"""``rslmi`` (default): sketched layer-LMI penalty with trained per-layer budgets tau_k."""

from __future__ import annotations

import math

import torch
from torch import nn

from lipverify.finetune.base import Method, clip_layers

OVERSAMPLE = 2  # fresh Gaussian columns per subspace-iteration step of a dense layer's sketch


class RSLMI(Method):
    """Sketched layer LMIs  tau_k I >= A_k^T A_k  under  prod_k sqrt(tau_k) <= L_train.

    loss + sum_k [ w_tau * log tau_k + alpha * (log lambda_max(S^T A_k^T A_k S) - log tau_k)_+ ]

    - The sketch S (orthonormal columns, so lambda_max(S^T A^T A S) <= ||A||^2 always). Dense
      layers (sketched on their weight matrix, n_k = input width): m warm-started Ritz vectors of
      W, one step of randomized subspace iteration per draw (``_draw``): a purely random
      m-dimensional sketch of an n-dimensional layer sees only about m/n of the top singular
      direction, so it would barely bite. Convolutions (sketched on their input tensor): the
      layer's tracked power-iteration vector and m - 1 fresh Gaussian directions.
    - Dense layers also get the sketched LMI made exact after each penalty step
      (``_clip_sketched``: the singular values of W on the sketch clipped at sqrt(tau_k)). The
      hinge alone is a soft constraint that the task loss overpowers at small targets.
    - tau_k = exp(s_k) are trained with the weights. The product constraint is the half-space
      sum_k s_k <= 2 log L_train, enforced exactly by Euclidean projection of s after each step.
      With it binding, the hinge gradients move the budget between layers: a layer whose norm the
      task loss wants larger gets a larger tau_k, paid for by the others. The hinge is in
      logarithms (relative violation), so alpha does not depend on the weights' scale;
      ``alpha_growth`` > 1 multiplies alpha every epoch.
    - Cost (the penalty's small ops cost as much as a training step of a small network): the
      penalty is evaluated every ``penalty_every`` steps with weight ``penalty_every`` (the same
      pull on average), and a sketch is drawn every ``sketch_every`` steps (seeded by (seed,
      step, layer)) and shared in between (the weights move little in a few steps; the penalty
      is still differentiated at the current weights). Both 4 by default.
    - ``finalize`` clips every layer to its trained budget sqrt(tau_k) (exact SVD clip for dense
      layers, a certified-norm rescale for convolutions): training has brought the layers close
      to their budgets, so this moves the weights little, and the product of the layer norms then
      meets L_train by construction, without the output rescale of the final correction.
    """

    name = "rslmi"
    description = "sketched layer-LMI penalty with trained per-layer budgets tau_k (default)"
    default_loss = "margin"

    def __init__(self, tg, target, opts, seed):
        super().__init__(tg, target, opts, seed)
        s0 = torch.tensor([2.0 * math.log(max(p.sigma, 1e-12)) for p in self.norms], dtype=torch.float32,
                          device=self.device)
        if opts.warm_start == "clip":  # equal budgets where the layers are above them
            s0 = s0.clamp(max=2.0 * math.log(self.L_train) / len(self.norms))
        self.s = nn.Parameter(s0)
        self._project_s()
        radii = [math.exp(float(sk) / 2) for sk in self.s.detach()]
        if opts.warm_start == "clip":
            clip_layers(self.layers, self.norms, radii, exact=True)
        else:
            self.warm_start([min(1.0, r / max(p.sigma, 1e-30)) for r, p in zip(radii, self.norms)])
        self.alpha = float(opts.alpha)
        self.every = max(1, int(opts.sketch_every))
        self.penalty_every = max(1, int(opts.penalty_every))
        self.sketches: list[torch.Tensor] | None = None
        self.last_lam = [p.sigma ** 2 for p in self.norms]
        self.blocks = [self._start_block(k, p) if p.dense else None for k, p in enumerate(self.norms)]

    def _start_block(self, k: int, p) -> torch.Tensor:
        n = p.v.numel()
        m = max(1, min(int(self.opts.sketch_dim), n))
        z = torch.cat([p.v.reshape(n, 1), self._random(n, m - 1, -1, k)], dim=1) if m > 1 else p.v.reshape(n, 1)
        return torch.linalg.qr(z)[0]

    def parameters(self):
        return [self.s]

    def _project_s(self) -> None:
        with torch.no_grad():
            excess = float(self.s.sum()) - 2.0 * math.log(self.L_train)
            if excess > 0:
                self.s -= excess / self.s.numel()

    def _random(self, n: int, cols: int, step: int, k: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 131 + k)
        return torch.randn(n, cols, generator=g, dtype=torch.float32).to(self.device)

    def _draw(self, step: int) -> None:
        """New sketches; random columns seeded by (seed, step, layer).

        Dense layers: one step of randomized subspace iteration, warm-started. The tracked block
        B (n x m) and OVERSAMPLE fresh Gaussian columns go through W^T W, are orthonormalized, and
        the top m Ritz vectors of W on that space become the new B and the sketch: it follows the
        layer's top singular subspace as the weights move, so the penalty and the clip act on the
        directions that make the norm. Convolutions: the tracked power vector and m - 1 fresh
        Gaussian directions of the input tensor."""
        self.sketches = []
        for k, p in enumerate(self.norms):
            n = p.v.numel()
            m = max(1, min(int(self.opts.sketch_dim), n))
            if p.dense:
                w = p.op.weight.detach()
                z = torch.cat([self.blocks[k], self._random(n, min(OVERSAMPLE, n), step, k)], dim=1)
                q, _ = torch.linalg.qr(w.T @ (w @ z))
                _, _, vh = torch.linalg.svd(w @ q, full_matrices=False)
                b = q @ vh[:m].T
                self.blocks[k] = b
                p.v = b[:, 0].reshape(p.v.shape).clone()
                self.sketches.append(b.T.contiguous())
                continue
            p.run(1)
            cols = [p.v.reshape(n, 1)]
            if m > 1:
                cols.append(self._random(n, m - 1, step, k))
            q, _ = torch.linalg.qr(torch.cat(cols, dim=1))
            self.sketches.append(q.T.reshape((q.shape[1],) + p.in_shape))

    def penalty(self, step):
        if step % self.penalty_every:
            return None
        if self.sketches is None or step % self.every == 0:
            self._draw(step)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for k, p in enumerate(self.norms):
            y = p.apply(self.sketches[k]).reshape(self.sketches[k].shape[0], -1)  # rows: A q_i
            with torch.no_grad():  # top eigenvector of the small m x m Gram matrix
                u = torch.linalg.eigh(y @ y.T)[1][:, -1]
            # lambda_max = ||Y^T u||^2 at that eigenvector: the same value and, by Hellmann-Feynman,
            # the same gradient as eigvalsh, without differentiating an eigendecomposition
            lam = (u @ y).pow(2).sum().clamp_min(1e-30)
            self.last_lam[k] = float(lam.detach())
            total = total + self.alpha * torch.relu(torch.log(lam) - self.s[k]) + self.opts.tau_weight * self.s[k]
        return total * self.penalty_every

    def after_step(self, step):
        self._project_s()
        if step % self.penalty_every == 0 and self.sketches is not None:
            self._clip_sketched()

    def _clip_sketched(self) -> None:
        """Dense layers: make the sketched LMI hold exactly. With Q = S^T (orthonormal columns)
        and the SVD W Q = U diag(sig) V^T, subtracting U diag((sig - r)_+) V^T Q^T from W clips
        the singular values of W on the sketched subspace at r = sqrt(tau_k) and changes nothing
        outside it (the Euclidean projection among such changes; O(m n) work). The hinge alone is
        soft: on the MNIST MLP at L = 0.5 the layers' product stayed near 3.5 times the target,
        so the final clip had to move the weights a long way; with this clip and the tracked
        subspace it stays within 25 % of it. Convolutions keep the hinge alone."""
        with torch.no_grad():
            for k, p in enumerate(self.norms):
                if not p.dense:
                    continue
                r = math.exp(float(self.s[k]) / 2)
                q = self.sketches[k].reshape(self.sketches[k].shape[0], -1).T  # (n, m)
                w = p.op.weight
                u, sig, vh = torch.linalg.svd(w @ q, full_matrices=False)
                excess = (sig - r).clamp(min=0.0)
                if float(excess.max()) > 0.0:
                    w -= (u * excess) @ (vh @ q.T)

    def end_epoch(self, epoch):
        self.alpha *= float(self.opts.alpha_growth)

    def finalize(self):
        radii = [math.exp(float(sk) / 2) * (1 - 1e-6) for sk in self.s.detach()]
        clip_layers(self.layers, self.norms, radii, exact=True)

    def state_dict(self):
        d = super().state_dict()
        d.update({"s": self.s.detach().clone(), "alpha": self.alpha,
                  "sketches": None if self.sketches is None else [q.clone() for q in self.sketches],
                  "blocks": [None if b is None else b.clone() for b in self.blocks]})
        return d

    def load_state_dict(self, state):
        super().load_state_dict(state)
        with torch.no_grad():
            self.s.copy_(state["s"].to(self.device))
        self.alpha = float(state["alpha"])
        self.sketches = None if state["sketches"] is None else [q.to(self.device) for q in state["sketches"]]
        self.blocks = [None if b is None else b.to(self.device) for b in state["blocks"]]
