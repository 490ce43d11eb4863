"""Graph transforms that change *what* is bounded: output selection (one logit, pairwise differences)."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from lipverify.errors import UserInputError
from lipverify.graph.ir import Graph, Node
from lipverify.graph.simplify import simplify
from lipverify.ops.dense import Dense
from lipverify.ops.shape import Reshape


def output_dim(graph: Graph) -> int:
    return math.prod(graph.output_shape)


def select_rows(graph: Graph, rows: np.ndarray, label: str) -> Graph:
    """A copy of ``graph`` whose output is ``rows @ flatten(output)``; merged into the last dense map."""
    # the as-extracted graph is shared, not copied: it is read only (rounding), and large
    g = copy.deepcopy(graph, memo={id(graph.as_file): graph.as_file} if graph.as_file is not None else None)
    rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    m = output_dim(g)
    if rows.shape[1] != m:
        raise ValueError(f"selection has {rows.shape[1]} columns, output has {m} entries")
    if graph.as_file is not None:
        before = graph.output_rows if graph.output_rows is not None else torch.eye(m, dtype=torch.float64)
        g.output_rows = torch.from_numpy(rows) @ before
    src = g.output
    if len(g.output_shape) != 1:
        g.nodes.append(Node(src + "::flat", Reshape((m,)), [src], (m,), "flatten output"))
        src = src + "::flat"
    g.nodes.append(Node(src + "::select", Dense(torch.from_numpy(rows)), [src], (rows.shape[0],), label))
    g.output = src + "::select"
    return simplify(g)


def select_output(graph: Graph, index: int) -> Graph:
    m = output_dim(graph)
    if not 0 <= index < m:
        raise UserInputError(f"--output {index} is out of range: the model has {m} outputs (0..{m - 1})")
    rows = np.zeros((1, m))
    rows[0, index] = 1.0
    return select_rows(graph, rows, f"output {index}")


def pairwise_difference(graph: Graph, i: int, j: int) -> Graph:
    """The map x -> f_i(x) - f_j(x), whose Lipschitz bound gives pairwise certified radii."""
    m = output_dim(graph)
    rows = np.zeros((1, m))
    rows[0, i], rows[0, j] = 1.0, -1.0
    return select_rows(graph, rows, f"output {i} - output {j}")
