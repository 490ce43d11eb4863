"""Registry of bound methods. ``register`` adds a method class under its name."""

from __future__ import annotations

from lipverify.bounds.base import BoundContext, BoundMethod, BoundResult, LayerBound

METHODS: dict[str, BoundMethod] = {}


def register(cls: type[BoundMethod]) -> type[BoundMethod]:
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> BoundMethod:
    from lipverify.errors import UserInputError

    if name not in METHODS:
        raise UserInputError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# importing the modules registers the methods
from lipverify.bounds import product  # noqa: E402,F401
from lipverify.bounds import lipsdp  # noqa: E402,F401
from lipverify.bounds import layerwise, rslmi  # noqa: E402,F401
from lipverify.bounds import compositional  # noqa: E402,F401
from lipverify.bounds import lipsdp_graph  # noqa: E402,F401

__all__ = ["BoundContext", "BoundMethod", "BoundResult", "LayerBound", "METHODS", "register", "get_method"]
