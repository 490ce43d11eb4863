"""Torch modules are certified only as they compute: every call lipverify makes of forward is watched.

A torch source (a ``--factory`` module, a spec model, a TorchScript archive) reaches extraction as an
ONNX export, made by tracing forward once. Tracing records the tensor operations one call ran: Python
control flow, numbers read from tensors and anything that asks "am I being traced?" are frozen or
lost. Tracer warnings are no defence on their own: the module's code can silence them. So each call of
a Python forward that lipverify makes (an eager call, the trace, the export) runs under a watch:

1. During the eager call a torch dispatch mode (``torch_record.OpRecorder``, below autograd) sees every ATen
   operation and knows which tensors depend on the input. It refuses any operation that hands an
   input-dependent value to Python (``bool(t)``, ``if t > 0:``, ``float(t)``, ``.item()``,
   ``torch.equal``, a shape that depends on values such as ``x[x > 0]``), in-place writes into a
   parameter or buffer, and random number generation. (A dispatch mode disturbs the tracer, so it
   watches the eager call only.)
2. A profile hook (``torch_record.CallWatcher``, ``sys.setprofile``) sees the Python and C calls made during forward.
   It refuses reads of input-dependent tensors that bypass the dispatcher (``.numpy()``, ``.tolist()``,
   ``.data_ptr()``, storages, ``__array__``, pickling), calls that switch the watch off or run code
   outside it (profilers, threads, processes, dispatch-mode stacks), and in the model's own code names
   that do so or that silence the tracer's warnings (frame inspection, ``_DisableTorchDispatch``,
   ``warnings.simplefilter``, ...); also Python clocks, random numbers, ``id()``, and autograd Functions
   with an ONNX ``symbolic`` (their export is what ``symbolic`` writes, not their forward).
3. A torch function mode (``torch_record.CallRecorder``) records every torch function the call makes (``torch.*``,
   ``F.*``, tensor methods and operators) with its arguments named by provenance (``TensorNames``). The
   calls recorded while tracing and while exporting must be those of the eager call. By 1 and 2 no
   Python decision in forward depends on the input's values, so the eager call makes the same calls
   for every input of the shape; by 3 the trace makes them too. A forward that branches on
   ``torch.jit.is_tracing()``, ``torch.onnx.is_in_onnx_export()``, the type of ``x.shape[0]`` or any other
   way to tell tracing apart is refused as soon as the branch changes what it computes. Model code that
   would run with the recorder switched off (a function of its own routed through ``__torch_function__``,
   a tensor subclass) is refused. A Python int taken from a traced size (a branch on the batch size) is
   left to the tracer's warnings, which refuse the model (``model._refuse_tracer_warnings``).
4. The module's state (``torch_state``: parameters, buffers, submodule and class attributes, closures,
   the globals of the Python code forward ran) is fingerprinted before and after the calls; a change (a
   call counter) is refused. Global module hooks and an overridden ``__call__`` (code that runs before
   the watch starts) are refused.
5. TorchScript archives carry no Python: their graph is checked (``torch_script.check_script_graph``)
   and their eager call is watched by 1 and 4. Custom ONNX symbolics are refused
   (``torch_script.refuse_custom_symbolics``).

What this cannot promise: Python code that deliberately takes apart torch's dispatch machinery by
means not listed above (a C extension, names built at run time), or rewrites torch or lipverify in
memory, runs with lipverify's own rights: a ``--factory`` module is code you execute. For a model from
an untrusted source, certify a file that carries no Python (ONNX, TorchScript).
"""

from __future__ import annotations

import sys

import torch

from lipverify.errors import UnsupportedModelError, UnsupportedOperationError
from lipverify.load.torch_record import CallRecorder, CallWatcher, OpRecorder, Refusals, TensorNames
from lipverify.load.torch_state import module_state, namespace_digests


def _refuse_code_outside_the_watch(module: torch.nn.Module) -> None:
    """The watch starts in the module's first forward pre-hook: code that runs before it (global module
    hooks, an overridden ``__call__``) could change the input or the output unseen."""
    import torch.nn.modules.module as nn_module

    problems = []
    for name in ("_global_forward_pre_hooks", "_global_forward_hooks"):
        if getattr(nn_module, name, None):
            problems.append(UnsupportedOperationError(name, "torch.nn", "global module hooks run around every "
                                                      "forward, outside lipverify's watch; remove them"))
    cls = type(module)
    for name in ("__call__", "_wrapped_call_impl", "_call_impl"):
        if name in vars(module) or getattr(cls, name, None) is not getattr(torch.nn.Module, name, None):
            problems.append(UnsupportedOperationError(name, cls.__name__, f"the module overrides {name}, which runs "
                                                      "outside lipverify's watch of forward"))
    if problems:
        raise UnsupportedModelError(problems)


class _Call:
    """The recorders of one forward call: names, the function stream, the eager call's dispatch mode."""

    def __init__(self, module, x, refusals: Refusals, namespaces: dict, eager: bool):
        self.names = TensorNames(module, x)
        self.calls = CallRecorder(self.names, refusals)
        self.ops = OpRecorder(self.names, refusals) if eager else None
        self.watcher = CallWatcher(self.names, refusals, namespaces)
        self.previous_profile = None

    def start(self, python: bool = True) -> None:
        self.calls.__enter__()
        if self.ops is not None:
            self.ops.__enter__()
        if python:
            self.previous_profile = sys.getprofile()
            sys.setprofile(self.watcher)

    def stop(self, output, python: bool = True) -> None:
        if python:
            sys.setprofile(self.previous_profile)
        self.names.paused = True
        self.calls.output = self.names.normalized(output)
        if self.ops is not None:
            self.ops.__exit__(None, None, None)
        self.calls.__exit__(None, None, None)


class ForwardWatch:
    """Runs calls of a module's forward under the recorders and the profile hook (see the module doc)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.scripted = isinstance(module, torch.jit.ScriptModule)
        if not self.scripted:
            _refuse_code_outside_the_watch(module)
        self.state = module_state(module)
        self.namespaces: dict[int, tuple[dict, dict]] = {}  # globals of the model's Python code
        self.eager: CallRecorder | None = None

    def run(self, what: str, call, example: torch.Tensor, compare: bool = False):
        """``call(x)`` calls forward (directly, through the tracer or the exporter); returns its result. The
        first run is the eager call. Refuses when a watched call did something listed in the module doc, or,
        with ``compare``, when its torch calls differ from those of the eager call."""
        refusals = Refusals()
        records: list[CallRecorder] = []
        x = example.clone()
        eager = self.eager is None
        if self.scripted:  # no Python inside: the interpreter's operations only
            rec = _Call(self.module, x, refusals, self.namespaces, eager)
            rec.start(python=False)
            try:
                result = call(x)
            finally:
                rec.stop(None, python=False)
            records.append(rec.calls)
        else:
            _refuse_code_outside_the_watch(self.module)  # again: the model's import or factory may add them later
            result = self._run_hooked(call, x, refusals, records, eager)
        refusals.raise_if_any()
        if not records:
            raise UnsupportedModelError([UnsupportedOperationError(
                "forward", what, "the module's forward was not called through lipverify's watch (its hooks were "
                "removed)")])
        if eager:
            if not isinstance(result, torch.Tensor):
                raise UnsupportedModelError([UnsupportedOperationError(
                    "forward", type(self.module).__name__, f"returns {type(result).__name__}, not one tensor: "
                    "lipverify certifies a module with one output (return the tensor to certify)")])
            self.eager = records[0]
        elif compare:
            for rec in records:
                self._compare(what, rec)
        self.check_state(what)
        return result

    def _run_hooked(self, call, x, refusals: Refusals, records: list, eager: bool):
        active: list[_Call] = []

        def pre(module, args):
            if active or not args or not isinstance(args[0], torch.Tensor):
                refusals.add("forward", "forward must be called once with one tensor (it calls itself, or is called "
                             "with other arguments)", "forward")
                return
            rec = _Call(module, args[0], refusals, self.namespaces, eager)
            active.append(rec)
            rec.start()

        def post(module, args, output):
            if active:
                rec = active.pop()
                rec.stop(output)
                records.append(rec.calls)

        handles = [self.module.register_forward_pre_hook(pre, prepend=True),
                   self.module.register_forward_hook(post, always_call=True)]
        try:
            return call(x)
        finally:
            for h in handles:
                h.remove()
            if active:  # the post hook never ran: the model removed it
                active.pop().stop(None)
                refusals.add("forward", "the module removed lipverify's hooks during forward", "forward")

    def _compare(self, what: str, rec: CallRecorder) -> None:
        eager = self.eager
        if rec.stream == eager.stream and rec.output == eager.output:
            return
        k = next((i for i, (a, b) in enumerate(zip(eager.stream, rec.stream)) if a != b),
                 min(len(eager.stream), len(rec.stream)))
        show = lambda s: (f"{s[k][0]}" if k < len(s) else "the output")  # noqa: E731
        raise UnsupportedModelError([UnsupportedOperationError(
            "forward", type(self.module).__name__,
            f"computes something else during {what} than when called (operation {k + 1}: {show(eager.stream)} when "
            f"called, {show(rec.stream)} during {what}): it depends on being traced (torch.jit.is_tracing(), "
            "torch.onnx.is_in_onnx_export(), the type of x.shape[0], ...) or on earlier calls; refusing to "
            "certify a different function")])

    def code_modules(self) -> tuple[str, ...]:
        """Names of the Python modules whose (not trusted) functions the watched calls ran: their source is
        part of the function the certificate is about."""
        return tuple(sorted({str(g.get("__name__", "?")) for g, _ in self.namespaces.values()}))

    def check_state(self, what: str) -> None:
        now = module_state(self.module)
        changed = [k for k in self.state if now.get(k) != self.state[k]] + [k for k in now if k not in self.state]
        for g, before in self.namespaces.values():
            after = namespace_digests(g)
            changed += [f"global {k!r} of {g.get('__name__', '?')}" for k in before if before[k] != after.get(k)]
            before.update((k, v) for k, v in after.items() if k not in before)  # a module still being imported
        if changed:
            raise UnsupportedModelError([UnsupportedOperationError(
                "forward", type(self.module).__name__,
                f"changed the module's state during {what} ({', '.join(sorted(changed)[:5])}): its output may "
                "depend on how many times it was called; refusing to certify it")])
