"""Registry of the Lipschitz-constrained training methods: ``rslmi`` (default), ``lip-loop``
(ADMM on the certificate), ``project`` (baseline) and ``plain`` (no constraint; timing baseline).
The shared interface is documented in base.py."""

from __future__ import annotations

from lipverify.errors import UserInputError
from lipverify.finetune.base import Method, Project
from lipverify.finetune.liploop import LipLoop
from lipverify.finetune.rslmi import RSLMI

METHODS = {"rslmi": RSLMI, "lip-loop": LipLoop, "project": Project, "plain": Method}


def make_method(name: str, tg, target: float, opts, seed: int) -> Method:
    if name not in METHODS:
        raise UserInputError(f"unknown --method {name!r}; choose one of rslmi, lip-loop, project, plain")
    return METHODS[name](tg, target, opts, seed)


def default_loss(name: str) -> str:
    """The task loss a method trains with under ``--loss auto``."""
    return METHODS[name].default_loss if name in METHODS else "ce"
