"""Exceptions with a meaning for the user and an exit code for the CLI.

Exit codes are a contract with CI pipelines: 0 pass, 1 gate failed, 2 bad input, 3 soundness bug.
"""


class LipverifyError(Exception):
    """Base class; ``exit_code`` tells the CLI how to exit."""

    exit_code = 2


class UserInputError(LipverifyError):
    """Bad input from the user: missing/corrupt file, wrong shape, bad option. Exit 2."""

    exit_code = 2


class UnsupportedOperationError(UserInputError):
    """The model contains an operation we cannot bound. Names the op and the node."""

    def __init__(self, op_type: str, node_name: str, detail: str = ""):
        self.op_type = op_type
        self.node_name = node_name
        msg = f"unsupported operation {op_type!r} at node {node_name!r}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class UnsupportedModelError(UnsupportedOperationError):
    """Several operations of one model cannot be bounded: all of them, each with its node and hint."""

    def __init__(self, problems: list[UnsupportedOperationError], onnx_nodes: list[dict] | None = None):
        self.problems = list(problems)
        self.onnx_nodes = onnx_nodes or []  # the model's ONNX nodes (for `inspect`)
        first = self.problems[0]
        self.op_type, self.node_name = first.op_type, first.node_name
        if len(self.problems) == 1:
            msg = str(first)
        else:
            msg = f"{len(self.problems)} unsupported operations:\n" + "\n".join(f"  - {p}" for p in self.problems)
        UserInputError.__init__(self, msg)


class ExtractionMismatchError(UserInputError):
    """The extracted graph does not compute what the original model computes."""


class SoundnessError(LipverifyError):
    """An internal soundness check failed (e.g. lower bound above certified upper bound). Exit 3."""

    exit_code = 3
