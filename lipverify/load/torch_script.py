"""TorchScript graphs that keep state or branch on the input; custom ONNX symbolics (see ``torch_watch``)."""

from __future__ import annotations

import torch

from lipverify.errors import UnsupportedModelError, UnsupportedOperationError


def _constant_int(value):
    node = value.node()
    if node.kind() == "prim::Constant" and node.output().type().kind() == "IntType":
        return node.output().toIValue()
    return None


def check_script_graph(module: torch.jit.ScriptModule, input_rank: int) -> None:
    """Refuse TorchScript that writes attributes or branches/loops on the input's values or batch size."""
    graph = module.inlined_graph
    dependent = {v.unique() for v in list(graph.inputs())[1:]}  # values that depend on the input
    problems: dict[tuple, UnsupportedOperationError] = {}
    hooks = [getattr(module._c, f"_get_{kind}", lambda: [])() for kind in ("forward_hooks", "forward_pre_hooks")]
    if any(hooks):  # a submodule's hooks are inlined into the graph; the root's run around it, unexported
        problems[("hooks",)] = UnsupportedOperationError(
            "forward hook", type(module).__name__, "the TorchScript module has forward hooks of its own: they run "
            "when it is called but are not part of its exported graph")

    def refuse(node, why):
        where = node.sourceRange().strip().split("\n")[0] if hasattr(node, "sourceRange") else ""
        problems.setdefault((node.kind(), where, why), UnsupportedOperationError(node.kind(), where or node.kind(), why))

    def depends(values) -> bool:
        return any(v.unique() in dependent for v in values)

    def mark(values) -> None:
        dependent.update(v.unique() for v in values)

    def scan(block) -> None:
        for node in block.nodes():
            kind, ins = node.kind(), list(node.inputs())
            if kind == "prim::SetAttr":
                refuse(node, f"forward assigns the attribute {node.s('name')!r}: its output may depend on how many "
                       "times it was called")
            elif kind in ("prim::If", "prim::Loop") and depends(ins[:1] if kind == "prim::If" else ins[:2]):
                refuse(node, "a branch or loop whose condition depends on the input's values or the batch size (the "
                       "export keeps one path)")
            if kind in ("aten::dim", "prim::device", "prim::dtype", "prim::layout", "aten::is_floating_point"):
                continue  # fixed by the input's shape and type
            if kind == "aten::size" and len(ins) == 2:
                axis = _constant_int(ins[1])
                if axis is not None and axis % max(input_rank, 1) != 0:
                    continue  # a per-sample dimension: fixed by the input shape
            blocks = list(node.blocks())
            if not blocks:
                if depends(ins):
                    mark(node.outputs())
                continue
            carried = kind == "prim::Loop"
            for _ in range(2 if carried else 1):  # a loop: values carried from one iteration to the next
                for b in blocks:
                    if carried:
                        mark(bi for bi, ni in zip(list(b.inputs())[1:], ins[2:]) if ni.unique() in dependent)
                    scan(b)
                    if carried:
                        mark(bi for bi, bo in zip(list(b.inputs())[1:], list(b.outputs())[1:])
                             if bo.unique() in dependent)
            returned = [list(b.outputs())[1:] if carried else list(b.outputs()) for b in blocks]
            for k, out in enumerate(node.outputs()):
                if any(k < len(r) and r[k].unique() in dependent for r in returned) or (
                        carried and k + 2 < len(ins) and ins[k + 2].unique() in dependent):
                    dependent.add(out.unique())

    scan(graph)
    if problems:
        raise UnsupportedModelError(list(problems.values()))


def refuse_custom_symbolics() -> None:
    """The exporter turns each ATen op into ONNX by a symbolic function; one registered by the model's code
    (torch.onnx.register_custom_op_symbolic) could export something else than what the op computes."""
    try:
        from torch.onnx._internal.torchscript_exporter.registration import registry
        groups = registry._registry.items()
        entries = [(name, f) for name, group in groups
                   for f in list(group._functions._overrides.values()) + list(group._functions._base.values())]
    except (ImportError, AttributeError):  # another torch layout: the self-check remains
        return
    custom = sorted({name for name, f in entries
                     if not (getattr(f, "__module__", "") or "").startswith("torch.")})
    if custom:
        raise UnsupportedModelError([UnsupportedOperationError(
            name, "ONNX export", "a custom ONNX symbolic function is registered for it: the export would not be what "
            "the operation computes") for name in custom])
