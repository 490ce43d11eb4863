"""The Lipschitz graph (IR): every model format becomes this, every bound method reads only this.

A DAG of nodes in topological order. Each node names the tensor it produces, the op that produces
it (an ``Op`` of one input or a ``MergeOp`` of several), its input tensor names and its per-sample
output shape (batch axis excluded). The graph is executable (``forward``) so it can be checked
against the original model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lipverify.ops.base import LinearOp, MergeOp, Op


@dataclass
class Node:
    name: str  # the tensor this node produces (unique in the graph)
    op: Op | MergeOp
    inputs: list[str]
    out_shape: tuple[int, ...]  # per sample
    source: str = ""  # name of the node(s) in the user's model this came from

    @property
    def is_merge(self) -> bool:
        return isinstance(self.op, MergeOp)


@dataclass
class Graph:
    input_name: str
    input_shape: tuple[int, ...]  # per sample
    nodes: list[Node] = field(default_factory=list)
    output: str = ""
    # The graph as extracted, before the exact rewrites (folds, merges) that tighten bounds: it does what
    # the file does step by step, so float32 rounding and overflow are measured on it. ``output_rows``
    # (a float64 matrix) then maps its flattened output to this graph's (selected logits, differences).
    as_file: "Graph | None" = field(default=None, repr=False)
    output_rows: torch.Tensor | None = field(default=None, repr=False)

    # -- structure -----------------------------------------------------------------------------
    def shape_of(self, name: str) -> tuple[int, ...]:
        if name == self.input_name:
            return self.input_shape
        return self.node(name).out_shape

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]

    def in_shape(self, node: Node) -> tuple[int, ...]:
        return self.shape_of(node.inputs[0])

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.shape_of(self.output)

    def is_chain(self) -> bool:
        """True when every node has one input: the previous node's output."""
        prev = self.input_name
        for n in self.nodes:
            if n.is_merge or n.inputs != [prev]:
                return False
            prev = n.name
        return prev == self.output

    def to(self, dtype: torch.dtype) -> "Graph":
        for n in self.nodes:
            n.op.to(dtype)
        return self

    # -- execution -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, keep: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
        """Run the graph on a batch. With ``keep`` return every intermediate tensor."""
        values = {self.input_name: x}
        remaining = self.last_use() if not keep else None
        for i, n in enumerate(self.nodes):
            args = [values[a] for a in n.inputs]
            values[n.name] = n.op.forward(*args)
            if remaining is not None:
                for a in set(n.inputs):
                    if remaining.get(a) == i and a != self.output:
                        del values[a]
        return values if keep else values[self.output]

    __call__ = forward

    def last_use(self) -> dict[str, int]:
        """Index of the last node that reads each tensor (for passes that drop tensors when done)."""
        last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.inputs:
                last[a] = i
        return last

    def linear_layers(self) -> list[Node]:
        return [n for n in self.nodes if isinstance(n.op, LinearOp)]

    def summary_rows(self) -> list[dict]:
        return [
            {"name": n.source or n.name, "op": n.op.describe(), "in_shape": list(self.in_shape(n)) if n.inputs else [],
             "out_shape": list(n.out_shape)}
            for n in self.nodes
        ]
