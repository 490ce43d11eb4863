"""What every bound method receives and returns.

Methods plug in like cvxpy's solvers: a registry of named methods over one graph representation.
A method returns a ``BoundResult`` whose ``value`` has passed the method's own float64 check;
``lipverify.verifier`` then re-checks it independently before anything is printed as certified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, TypeVar

from lipverify.graph.ir import Graph
from lipverify.timebudget import TimeBudget

T = TypeVar("T")


@dataclass
class BoundContext:
    device: str = "cpu"
    time_budget: TimeBudget = field(default_factory=TimeBudget)  # the run's one --budget-s (unlimited by default)
    budget_mem: int | None = None  # bytes
    seed: int = 0
    track: Callable[[Iterable[T], str, int | None], Iterable[T]] = lambda it, desc, total=None: it
    status: Callable[[str], None] = lambda text: None  # live detail of the running loop (progress display only)
    options: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)  # shared by runs on related graphs (e.g. pairwise outputs)

    @property
    def budget_s(self) -> float | None:
        """Seconds left of the run's --budget-s (None: no time limit); read it when a stage starts."""
        return self.time_budget.left()


@dataclass
class LayerBound:
    name: str
    op: str
    in_shape: list[int]
    out_shape: list[int]
    factor: float | None  # certified Lipschitz factor of this node (None for a merge: it combines bounds)
    lower: float | None  # lower estimate of the factor (power iteration / exact value)
    how: str
    extra: dict = field(default_factory=dict)  # e.g. "cumulative": the certified bound up to this node

    @property
    def tau(self) -> float | None:
        return None if self.factor is None else self.factor * self.factor

    def as_dict(self) -> dict:
        d = {"name": self.name, "op": self.op, "in_shape": self.in_shape, "out_shape": self.out_shape,
             "factor": self.factor, "tau": self.tau, "lower": self.lower, "how": self.how}
        d.update(self.extra)
        return d


@dataclass
class BoundResult:
    method: str
    value: float  # certified upper bound on the Lipschitz constant
    layers: list[LayerBound]
    check: str  # the method's own verification that passed
    witness: dict = field(default_factory=dict)  # exactly what the verifier re-checks
    seconds: float = 0.0
    info: dict = field(default_factory=dict)  # method details shown to users, NOT verified (estimates, choices)
    notes: list[str] = field(default_factory=list)
    # what happened inside the method: {"converged": bool, "stop": why it stopped, and e.g.
    # "duality_gap", "newton_steps"}; a user's explicit budget cutting it short is said here
    solver: dict = field(default_factory=dict)


class BoundMethod:
    name = "method"
    description = ""

    # auto skips this method when one of these methods runs on the same graph (it cannot be tighter)
    auto_superseded_by: tuple[str, ...] = ()

    def not_applicable(self, graph: Graph) -> str | None:
        """A reason this method cannot bound ``graph``, or None."""
        return None

    # what pairwise radii use instead when ``fits_pairs`` says no
    pair_fallback: str | None = None

    def fits_auto(self, graph: Graph, device: str = "cpu") -> bool:
        """Whether ``auto`` runs this method (a rule on the network's sizes, never on measured time)."""
        return True

    def fits_pairs(self, graph: Graph, n_problems: int, device: str = "cpu") -> bool:
        """Whether pairwise radii run this method on all ``n_problems`` logit differences (a rule on sizes)."""
        return True

    def run(self, graph: Graph, ctx: BoundContext) -> BoundResult:  # pragma: no cover - abstract
        raise NotImplementedError
