"""The recorders of one watched forward call (see ``torch_watch`` for why and how they are used).

``TensorNames`` names tensors by provenance; ``OpRecorder`` (a dispatch mode, eager call only) refuses
ATen operations that leak input-dependent values to Python; ``CallWatcher`` (``sys.setprofile``)
refuses reads and escapes outside the dispatcher; ``CallRecorder`` (a function mode) records the torch
calls that the trace and the export must repeat.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import types

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lipverify.errors import UnsupportedModelError, UnsupportedOperationError
from lipverify.load.torch_state import as_numpy, digest_array, is_lipverify_file, is_trusted, is_trusted_file, \
    namespace_digests


def _where(frame=None) -> str:
    """file:line of the innermost frame of the model's own code on the stack (else the innermost frame
    that is not lipverify)."""
    frame = frame or sys._getframe(1)
    fallback = None
    while frame is not None:
        name = frame.f_code.co_filename
        if not is_trusted(frame.f_code, frame.f_globals):
            return f"{os.path.basename(name)}:{frame.f_lineno} in {frame.f_code.co_name}"
        if fallback is None and not is_lipverify_file(name):
            fallback = f"{os.path.basename(name)}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return fallback or "forward"


class Refusals:
    """What a watched call did that makes its trace unfaithful; raised once the call is over (raising
    inside forward could be caught by the model's own code)."""

    def __init__(self):
        self.problems: dict[tuple[str, str], UnsupportedOperationError] = {}

    def add(self, what: str, why: str, where: str | None = None) -> None:
        where = where or _where(sys._getframe(1))
        self.problems.setdefault((what, where), UnsupportedOperationError(what, where, why))

    def raise_if_any(self) -> None:
        if self.problems:
            raise UnsupportedModelError(list(self.problems.values()))


# ------------------------------------------------------------------------------------------------
# tensors named by how they were computed

DATA_READ = ("cannot be traced faithfully: forward reads a value computed from the input into Python (an `if` on "
             "a tensor, bool(), float(), .item(), .tolist(), .numpy(), ...); the trace would freeze the value of "
             "one input and certify another function")


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr() if t.device.type != "meta" else None
    except (RuntimeError, NotImplementedError):  # sparse, nested: no plain storage
        return None


class TensorNames:
    """Names tensors by provenance: ``x`` (the input), ``p:NAME`` (parameters, buffers), ``KEY.k`` (outputs
    of a recorded call, KEY a digest of the call and its named arguments), constants by content. Knows
    which tensors depend on the input (``is_data``), also through aliases made outside torch's functions
    (``x.data``: same storage)."""

    def __init__(self, module: torch.nn.Module, x: torch.Tensor):
        self.names: dict[int, str] = {}
        self.keep: list = []  # tensors stay alive so that their id() is not reused during the call
        self.data: set[str] = {"x"}
        self.data_storages = {s for s in [_storage(x)] if s is not None}
        self.param_storages: dict[int, str] = {}
        self.paused = False  # lipverify's own tensor operations are not the model's
        self.name(x, "x")
        for n, t in list(module.named_parameters()) + list(module.named_buffers()):
            self.name(t, "p:" + n)
            if _storage(t) is not None:
                self.param_storages.setdefault(_storage(t), n)

    def name(self, t, name: str, derived: bool = False) -> None:
        self.names[id(t)] = name
        self.keep.append(t)
        if derived:
            self.data.add(name)
            if _storage(t) is not None:
                self.data_storages.add(_storage(t))

    def name_of(self, t: torch.Tensor) -> str:
        name = self.names.get(id(t))
        if name is None:  # made outside the recorded calls: x.data, a tensor built in Python, a traced size
            storage = _storage(t)
            where = f"@{t.storage_offset()},{tuple(t.stride())}"
            if storage is not None and storage in self.data_storages:
                name = f"x-alias{where}"
                self.data.add(name)
            elif storage is not None and storage in self.param_storages:
                name = f"p:{self.param_storages[storage]}{where}"
            elif t.dim() == 0 and not t.is_floating_point() and not t.is_complex():
                return repr(as_numpy(t).item())  # a size: a tensor while tracing, an int when called
            else:
                name = "c:" + digest_array(t)
            self.name(t, name)
        return name

    def is_data(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        if id(t) in self.names:
            return self.names[id(t)] in self.data
        storage = _storage(t)
        return storage is not None and storage in self.data_storages

    def normalized(self, a):
        if isinstance(a, torch.Tensor):
            return self.name_of(a)
        if isinstance(a, (list, tuple)):  # torch.Size too
            return [self.normalized(b) for b in a]
        if isinstance(a, dict):
            return sorted((str(k), self.normalized(v)) for k, v in a.items())
        if isinstance(a, slice):
            return ("slice", self.normalized(a.start), self.normalized(a.stop), self.normalized(a.step))
        return repr(a)

    def record_outputs(self, key: str, out, derived: bool) -> None:
        for k, o in enumerate(v for v in tree_flatten(out)[0] if isinstance(v, torch.Tensor)):
            self.name(o, f"{key}.{k}", derived)


# ------------------------------------------------------------------------------------------------
# 1. every ATen operation of the eager call

METADATA_OPS = {"aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset", "aten::size",
                "aten::stride", "aten::numel", "aten::dim", "aten::is_same_size", "aten::is_contiguous",
                "aten::is_non_overlapping_and_dense"}


def _shape_depends_on_values(func, schema: str, args, names: TensorNames) -> bool:
    tags = func.tags
    if torch.Tag.dynamic_output_shape not in tags and torch.Tag.data_dependent_output not in tags:
        return False
    if schema in ("aten::index", "aten::index_put", "aten::_unsafe_index"):  # only a mask made from the input
        indices = args[1] if len(args) > 1 else []
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) and names.is_data(i)
                   for i in indices or [])
    return True


def _no_dropout(func, args, kwargs) -> bool:
    """Attention kernels are tagged random for their dropout; with dropout_p = 0 they are not."""
    for k, arg in enumerate(func._schema.arguments):
        if arg.name == "dropout_p":
            value = args[k] if k < len(args) else kwargs.get(arg.name, arg.default_value)
            return value == 0
    return False


class OpRecorder(TorchDispatchMode):
    """Refuses, during the eager call, ATen operations that leak input-dependent values to Python, write
    into parameters or draw random numbers. (Only the eager call: a dispatch mode disturbs the tracer.)"""

    def __init__(self, names: TensorNames, refusals: Refusals):
        super().__init__()
        self.names, self.refusals = names, refusals
        self.count = 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.names.paused:
            return out
        schema = func._schema.name
        derived = any(self.names.is_data(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor))
        leaves = tree_flatten(out)[0]
        if not any(isinstance(v, torch.Tensor) for v in leaves):  # a Python number
            if derived and schema not in METADATA_OPS:
                self.refusals.add(str(func), DATA_READ)
            return out
        if torch.Tag.nondeterministic_seeded in func.tags and not _no_dropout(func, args, kwargs):
            self.refusals.add(str(func), "draws random numbers: the output is not a function of the input")
        if derived and _shape_depends_on_values(func, schema, args, self.names):
            self.refusals.add(str(func), "cannot be traced faithfully: the shape of its result depends on the input's "
                              "values (nonzero, unique, a boolean mask); a Python read of that shape would be frozen at "
                              "one input")
        self.count += 1
        key = f"op{self.count}"
        if derived:
            self.names.record_outputs(key, [o for o in leaves if self.names.names.get(id(o)) is None], True)
        if func._schema.is_mutable:
            for k, arg in enumerate(func._schema.arguments):
                a = args[k] if k < len(args) else kwargs.get(arg.name)
                if arg.alias_info is None or not arg.alias_info.is_write or not isinstance(a, torch.Tensor):
                    continue
                target = self.names.param_storages.get(_storage(a)) if _storage(a) is not None else None
                if target is not None:
                    self.refusals.add(str(func), f"writes into the parameter or buffer {target!r} in place: the "
                                      "module changes from one call to the next")
                if derived:
                    self.names.name(a, f"{key}.w{k}", True)
        return out


# ------------------------------------------------------------------------------------------------
# 2. the Python and C calls of one forward call

TENSOR_READS = {"numpy", "tolist", "data_ptr", "untyped_storage", "_typed_storage", "storage", "__array__",
                "__dlpack__", "__reduce_ex__", "__getstate__", "__cuda_array_interface__"}
TENSOR_READ_CODES = {getattr(torch.Tensor, n).__code__ for n in TENSOR_READS
                     if hasattr(getattr(torch.Tensor, n, None), "__code__")}
# names whose use in the model's own code would switch the watch off or look around it
ESCAPE_NAMES = {"_DisableTorchDispatch", "_DisablePythonDispatcher", "_disable_current_modes", "_pop_mode",
                "_pop_mode_temporarily", "_pop_torch_dispatch_stack", "_push_on_torch_dispatch_stack",
                "_set_dispatch_mode", "_unset_dispatch_mode", "_ExcludeDispatchKeyGuard", "_AutoDispatchBelowAutograd",
                "_AutoDispatchBelowADInplaceOrView", "_set_tracing_state", "setprofile", "settrace", "monitoring",
                "DisableTorchFunction", "DisableTorchFunctionSubclass", "_pop_torch_function_stack",
                "_push_on_torch_function_stack", "_getframe", "f_back", "tb_frame", "gi_frame", "start_new_thread",
                "_forward_hooks", "_forward_pre_hooks",
                # the tracer's warnings still flag Python ints taken from sizes (a branch on the batch size)
                "simplefilter", "filterwarnings", "resetwarnings", "catch_warnings", "showwarning", "_showwarnmsg",
                "_jit_set_tracer_state_warn",
                # ways to reach a tensor's memory without the dispatcher
                "ctypes", "to_dlpack", "_to_dlpack", "__dlpack__", "_cdata"}


def _builtins(*specs) -> set[int]:
    found = set()
    for module, names in specs:
        for n in names.split():
            f = getattr(module, n, None)
            if f is not None:
                found.add(id(f))
    return found


CLOCKS_AND_RANDOMNESS = _builtins(
    (__import__("time"), "time time_ns perf_counter perf_counter_ns monotonic monotonic_ns process_time "
                         "process_time_ns thread_time thread_time_ns"),
    (os, "urandom getrandom"), (__import__("builtins"), "id"))
ESCAPES = _builtins(
    (sys, "setprofile settrace"), (__import__("_thread"), "start_new_thread start_joinable_thread"),
    (os, "fork forkpty posix_spawn posix_spawnp system execv execve"),
    (torch._C, "_pop_torch_dispatch_stack _push_on_torch_dispatch_stack _set_dispatch_mode _unset_dispatch_mode "
               "_set_tracing_state _to_dlpack _pop_torch_function_stack _push_on_torch_function_stack"))
FUNCTION_APPLY = torch.autograd.Function.apply.__func__.__code__


class CallWatcher:
    """The profile hook of one forward call (``sys.setprofile``)."""

    def __init__(self, names: TensorNames, refusals: Refusals, namespaces: dict):
        self.names, self.refusals, self.namespaces = names, refusals, namespaces
        self.scanned: set = set()

    def __call__(self, frame, event, arg):
        if event == "c_call":
            self._c_call(frame, arg)
        elif event == "call":
            self._call(frame)

    def _c_call(self, frame, fn) -> None:
        if is_lipverify_file(frame.f_code.co_filename):
            return  # lipverify's own bookkeeping
        owner = getattr(fn, "__self__", None)
        name = getattr(fn, "__name__", "")
        if isinstance(owner, torch.Tensor):
            if name in TENSOR_READS and self.names.is_data(owner):
                self.refusals.add(f"Tensor.{name}", DATA_READ, _where(frame))
            return
        if is_trusted(frame.f_code, frame.f_globals):
            return
        if id(fn) in ESCAPES:
            self.refusals.add(name, "switches lipverify's watch of forward off or runs code outside it",
                              _where(frame))
        elif id(fn) in CLOCKS_AND_RANDOMNESS or isinstance(owner, random.Random) or \
                type(owner).__module__.startswith("numpy.random") or getattr(fn, "__module__", None) == "numpy.random":
            self.refusals.add(name, "reads a clock, random numbers or object identities: the output is not a "
                              "function of the input", _where(frame))

    def _call(self, frame) -> None:
        code = frame.f_code
        if code in TENSOR_READ_CODES:
            if not is_lipverify_file(frame.f_back.f_code.co_filename) and self.names.is_data(
                    frame.f_locals.get("self")):
                self.refusals.add(f"Tensor.{code.co_name}", DATA_READ, _where(frame))
            return
        if code is FUNCTION_APPLY:
            cls = frame.f_locals.get("cls")
            if hasattr(cls, "symbolic") and not is_trusted_file(
                    getattr(sys.modules.get(cls.__module__), "__file__", None) or "<unknown>"):
                self.refusals.add(f"{cls.__name__}.apply", "an autograd Function with an ONNX symbolic(): its export "
                                  "is what symbolic() writes, not what its forward computes", _where(frame.f_back))
            return
        if code in self.scanned or is_trusted(code, frame.f_globals):
            return
        self.scanned.add(code)
        escapes = ESCAPE_NAMES.intersection(code.co_names)
        if escapes:
            self.refusals.add(", ".join(sorted(escapes)), "the model's code uses names that switch lipverify's watch "
                              "of forward off or look around it", _where(frame))
        g = frame.f_globals
        if id(g) not in self.namespaces:
            self.names.paused = True
            try:
                self.namespaces[id(g)] = (g, namespace_digests(g))
            finally:
                self.names.paused = False


# ------------------------------------------------------------------------------------------------
# 3. every torch function call of each watched call (eager, tracing, export)

SHAPE_QUERIES = {"size", "shape", "dim", "ndim", "ndimension", "numel", "nelement", "stride", "__len__",
                 "storage_offset", "is_contiguous"}


def _function_name(func) -> str:
    owner = getattr(func, "__self__", None)
    if type(func).__name__ == "method-wrapper" and hasattr(owner, "__objclass__"):  # a property of Tensor
        return f"{owner.__objclass__.__name__}.{owner.__name__}"
    return f"{getattr(func, '__module__', None) or ''}.{getattr(func, '__qualname__', None) or repr(func)}"


_C_CALLABLES = (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
                types.MethodWrapperType, types.ClassMethodDescriptorType)


def _outside_the_record(func, tensors) -> str | None:
    """Why a call would run Python of the model's own with this recorder switched off (a mode is off inside
    its handler): a model function routed through ``__torch_function__``, or a tensor subclass."""
    code = getattr(func, "__code__", None)
    if not (isinstance(func, _C_CALLABLES) or isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
            or code is not None and is_trusted_file(code.co_filename)):
        return f"{getattr(func, '__qualname__', type(func).__name__)} is routed through __torch_function__"
    for t in tensors:
        cls = type(t)
        if cls not in (torch.Tensor, torch.nn.Parameter) and not is_trusted_file(
                getattr(sys.modules.get(cls.__module__), "__file__", None) or "<unknown>"):
            return f"a tensor of the subclass {cls.__qualname__} (its __torch_function__/__torch_dispatch__)"
    return None


class CallRecorder(TorchFunctionMode):
    """The torch functions one forward call made (``torch.*``, ``F.*``, tensor methods and operators), with
    their arguments named by provenance. Queries of sizes, and arithmetic on them, are not recorded: under
    tracing sizes are tensors, when called they are ints; their values are compared where they are used."""

    def __init__(self, names: TensorNames, refusals: Refusals):
        super().__init__()
        self.names, self.refusals = names, refusals
        self.stream: list[tuple] = []
        self.output = None

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _function_name(func)
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if self.names.paused or name.rsplit(".", 1)[-1] in SHAPE_QUERIES or tensors and all(
                id(t) not in self.names.names and t.dim() == 0 and not t.is_floating_point() for t in tensors):
            return func(*args, **kwargs)  # lipverify's own work, a size, arithmetic on sizes
        hidden = _outside_the_record(func, tensors)
        if hidden:
            self.refusals.add(name, f"{hidden}: its operations run unrecorded, where they could tell tracing apart")
        record = (name, self.names.normalized(list(args)), self.names.normalized(kwargs))  # before an in-place call
        derived = any(self.names.is_data(t) for t in tensors)
        out = func(*args, **kwargs)
        if any(isinstance(v, torch.Tensor) for v in tree_flatten(out)[0]):  # Python values show where used
            key = hashlib.sha256(repr(record).encode()).hexdigest()[:20]
            self.stream.append(record)
            self.names.record_outputs(key, out, derived)
        return out
