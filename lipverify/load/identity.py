"""What, besides the model file, decides the function a certificate is about.

A safetensors file holds weights only: the architecture comes from the spec JSON (and --activation).
A state dict's architecture comes from the --factory code. A certificate that recorded only the
weights' sha256 would stay VALID under another spec (say a different BatchNorm eps) or edited factory
code, i.e. for a different network. So the certificate's model block records this identity and
``lipverify check`` refuses a certificate whose identity differs from the one it recomputes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from pathlib import Path

from lipverify.load.model import LoadedModel


def architecture_identity(loaded: LoadedModel, factory: str | None = None) -> dict:
    """JSON-ready identity of everything but the weights file that shapes the model's function."""
    identity: dict = {"format": loaded.format}
    if loaded.spec is not None:
        # the parsed spec (activation folded in by the loader), canonically serialised
        canonical = json.dumps(loaded.spec, sort_keys=True, separators=(",", ":"), default=str)
        identity["spec_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    if factory:
        identity["factory"] = factory
        identity["factory_sources"] = _module_sources(loaded, {factory.split(":", 1)[0]})
    return identity


def _module_sources(loaded: LoadedModel, names: set[str]) -> dict[str, str]:
    """sha256 of the source file of the given modules, of every module defining a class in the built network
    and of every module whose functions its forward ran (a helper module edited between certify and check
    changes the network)."""
    names = set(names) | set(loaded.code_modules)
    if loaded.torch_module is not None:
        names |= {type(m).__module__ for m in loaded.torch_module.modules()}
    sources = {}
    for name in sorted(names):
        if name.startswith("torch.") or name == "torch":
            continue  # the library itself: recorded in versions
        module = sys.modules.get(name)
        try:
            path = inspect.getsourcefile(module) if module is not None else None
        except TypeError:  # built-in module
            path = None
        sources[name] = _sha256(Path(path)) if path and Path(path).is_file() else "no source file"
    return sources


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def identity_differences(recorded: dict, recomputed: dict) -> list[str]:
    """Human-readable differences (empty when the identities agree)."""
    problems = []
    for key in sorted(set(recorded) | set(recomputed)):
        if recorded.get(key) != recomputed.get(key):
            problems.append(f"{key}: certificate {recorded.get(key)!r}, now {recomputed.get(key)!r}")
    return problems
