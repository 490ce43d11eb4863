"""Constrained retraining until a target Lipschitz bound is certified (``lipverify fine-tune``).

``finetune(model_path, out_path, FinetuneOptions(target_L=...))`` trains the model's lipverify IR
with one of the methods in :mod:`lipverify.finetune.methods` (``rslmi``, ``lip-loop``, ``project``,
``plain``) and a task loss from :mod:`lipverify.finetune.losses`, exports it in the input's format,
certifies the exported file from disk, applies an exact output rescale as a last resort when the
certified bound is still above the target, and writes a certificate JSON. Under ``torchrun`` the
training is data-parallel (:mod:`lipverify.finetune.distributed`). Layout: docs/architecture.md, 7.
"""

from lipverify.finetune.methods import METHODS
from lipverify.finetune.train import FinetuneOptions, FinetuneResult, TrainableGraph, TrainingInterrupted, finetune

__all__ = ["FinetuneOptions", "FinetuneResult", "TrainableGraph", "TrainingInterrupted", "finetune", "METHODS"]
