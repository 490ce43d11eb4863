"""Which code is the model's, and fingerprints of the state a forward call could change.

Used by ``torch_watch``: the model's own code is everything outside torch, the standard library and
lipverify; its state is the module tree (parameters, buffers, attributes), the class attributes and
closures of the model's classes, and the globals of the model's Python code.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import types
import warnings

import numpy as np
import torch

def _folder(path: str) -> str:
    return os.path.realpath(path) + os.sep


OWN_DIR = _folder(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lipverify/
TRUSTED_DIRS = tuple({OWN_DIR, _folder(os.path.dirname(torch.__file__)), _folder(os.path.dirname(np.__file__)),
                      *(_folder(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib"))})
_TRUSTED: dict[str, bool] = {}


def is_trusted_file(filename: str) -> bool:
    """torch, numpy, the standard library and lipverify: not the model's code."""
    hit = _TRUSTED.get(filename)
    if hit is None:
        hit = filename.startswith("<frozen ") or (not filename.startswith("<") and
                                                   os.path.realpath(filename).startswith(TRUSTED_DIRS))
        _TRUSTED[filename] = hit
    return hit


def is_lipverify_file(filename: str, _cache: dict = {}) -> bool:  # noqa: B006 (a cache)
    hit = _cache.get(filename)
    if hit is None:
        hit = _cache[filename] = not filename.startswith("<") and os.path.realpath(filename).startswith(OWN_DIR)
    return hit


def is_trusted(code, frame_globals: dict) -> bool:
    """Code generated at run time (``<string>``: dataclasses, namedtuples) belongs to the module whose
    globals it runs with."""
    if code.co_filename.startswith("<") and not code.co_filename.startswith("<frozen "):
        return is_trusted_file(frame_globals.get("__file__") or "<unknown>")
    return is_trusted_file(code.co_filename)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """The tensor's values (numpy gives plain ints for the shape even while tracing); lipverify's own read,
    so the tracer's warning about it is not the model's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        c = t.detach().cpu()
        if c.dtype in (torch.bfloat16, torch.float16):
            c = c.view(torch.int16)
        elif c.dtype == torch.bool:
            c = c.to(torch.uint8)
        return c.numpy()


def digest_array(t: torch.Tensor) -> str:
    a = np.ascontiguousarray(as_numpy(t))
    return hashlib.sha256(repr((str(t.dtype), a.shape)).encode() + a.tobytes()).hexdigest()[:20]


def digest(v, depth: int = 3, own_module: str | None = None) -> str:
    """A digest of plain data (numbers, strings, tensors, arrays and containers of them, ``depth`` levels
    deep) and of the attributes of instances of ``own_module``'s classes; any other object by identity: a
    counter kept in plain data or in the model's own objects is seen, a rebinding is seen."""
    h = hashlib.sha256()

    def feed(v, depth):
        if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
            h.update(repr(v).encode())
        elif isinstance(v, torch.Tensor):
            h.update(b"T" + (digest_array(v).encode() if v.layout == torch.strided and v.device.type != "meta"
                             else repr(id(v)).encode()))
        elif isinstance(v, np.ndarray):
            h.update(b"A" + repr((v.dtype.str, v.shape)).encode() + np.ascontiguousarray(v).tobytes())
        elif isinstance(v, (list, tuple, dict, set, frozenset)) and depth > 0:
            items = list(v.items()) if isinstance(v, dict) else sorted(v, key=repr) if isinstance(
                v, (set, frozenset)) else list(v)
            h.update(f"{type(v).__name__}{len(items)}[".encode())
            for item in items[:1000]:
                feed(item, depth - 1)
        elif own_module is not None and type(v).__module__ == own_module and hasattr(v, "__dict__") and depth > 0 \
                and not isinstance(v, (type, types.ModuleType, types.FunctionType, torch.nn.Module)):
            h.update(f"{type(v).__qualname__}@{id(v)}{{".encode())
            feed(dict(vars(v)), depth - 1)
        else:
            h.update(f"{type(v).__qualname__}@{id(v)}".encode())

    try:
        feed(v, depth)
    except Exception:  # an object that cannot be read: compare it by identity
        return f"unreadable {id(v)}"
    return h.hexdigest()


def namespace_digests(g: dict) -> dict[str, str]:
    own = g.get("__name__")
    return {k: digest(v, own_module=own) for k, v in list(g.items()) if not (k.startswith("__") and k.endswith("__"))}


def model_classes(module: torch.nn.Module) -> list[type]:
    seen = []
    for m in module.modules():
        for cls in type(m).__mro__:
            file = getattr(sys.modules.get(cls.__module__), "__file__", None) or "<unknown>"
            if cls not in seen and not is_trusted_file(file):
                seen.append(cls)
    return seen


def module_state(module: torch.nn.Module) -> dict[str, str]:
    """label -> digest of everything a forward call could change about the module."""
    state = {}
    for prefix, m in module.named_modules():
        where = prefix or "the module"
        for n, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            state[f"tensor {prefix + '.' if prefix else ''}{n}"] = digest(t)
        if isinstance(m, torch.jit.ScriptModule):
            continue  # its attributes are written only by prim::SetAttr, refused on the graph
        for k, v in vars(m).items():
            if k not in ("_parameters", "_buffers", "_modules") and "hook" not in k:
                state[f"attribute {k!r} of {where}"] = digest(v)
    for cls in model_classes(module):
        for k, v in vars(cls).items():
            if isinstance(v, types.FunctionType) and v.__closure__:
                state[f"closure of {cls.__qualname__}.{k}"] = digest([c.cell_contents for c in v.__closure__
                                                                       if _cell_full(c)])
            elif not (k.startswith("__") or callable(v) or isinstance(v, (property, staticmethod, classmethod))):
                state[f"class attribute {cls.__qualname__}.{k}"] = digest(v)
    return state


def _cell_full(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False
