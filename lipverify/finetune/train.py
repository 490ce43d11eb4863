"""``lipverify fine-tune``: retrain a model until a target Lipschitz bound is certified.

What is trained: the lipverify IR of the model (the graph ``certify`` extracts and bounds), with
the weights and biases of its Dense and Conv nodes turned into ``nn.Parameter``s. BatchNorm is
therefore *folded* into the adjacent convolution before training (``graph.simplify``), never
trained as such; input normalization and other fixed scalings stay fixed. Training the IR means
the penalty acts on exactly the operators the certificate bounds, whatever the input format.

Pipeline: load -> extract IR -> data checks -> accuracy of the original -> train (method penalty /
projection, checkpoints) -> export in the input's format -> ``certify`` the exported file from
disk -> if its certified L exceeds the target, exact final correction (scale the output layer by
target/L, re-export, re-certify) -> accuracy and certified accuracy of the exported file ->
certificate JSON beside it.

Reproducibility: one thread, ``torch.manual_seed(seed)``, the batch order of epoch e drawn from a
generator seeded with (seed, e), sketches seeded by (seed, step, layer). A checkpoint holds the
weights, the optimizer state, the method's state and the position (epoch, step), so a resumed run
follows the uninterrupted one step for step and ends with identical weights.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lipverify.errors import LipverifyError, UserInputError
from lipverify.fileio import atomic_write_bytes, write_json
from lipverify.finetune import export as ex
from lipverify.finetune.methods import make_method
from lipverify.ops.conv import Conv
from lipverify.ops.dense import Dense

CHECKPOINT_VERSION = 1
_SOURCE_CERTS: dict = {}


class TrainingInterrupted(LipverifyError):
    """Ctrl-C during training: a checkpoint was saved; ``--resume`` continues from it."""

    exit_code = 130


@dataclass
class FinetuneOptions:
    target_L: float
    data: str | None = None
    val: str | None = None
    method: str = "rslmi"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    distill: bool = False
    eps: float = 0.1  # certified accuracy is reported at this radius
    # data reading (mirrors certify's data options)
    x_key: str = "x"
    y_key: str = "y"
    label_column: str = "label"
    transform: str | None = None
    limit: int | None = None
    # model loading
    input_shape: tuple[int, ...] | None = None
    spec: str | None = None
    activation: str = "relu"
    # method settings
    sketch_dim: int = 8
    alpha: float = 0.3
    alpha_growth: float = 1.0
    tau_weight: float = 0.0
    warm_start: str = "clip"  # rslmi start: "clip" (SVD clip to the budgets) or "scale" (rescale, same argmax)
    rho: float = 0.3
    rho_growth: float = 1.0
    admm_every: int = 10
    # certification of the exported file
    certify_method: str = "auto"
    lower_starts: int = 8
    lower_budget_s: float | None = None
    # files
    checkpoint: str | None = None
    resume: bool = False
    force: bool = False
    certificate: str | None = None

    def settings(self) -> dict:
        d = asdict(self)
        for k in ("checkpoint", "resume", "force", "certificate"):
            d.pop(k)
        d["input_shape"] = list(self.input_shape) if self.input_shape else None
        return d


@dataclass
class FinetuneResult:
    out_path: Path
    certificate_path: Path
    certificate: dict  # the JSON written beside the output
    target_met: bool
    files: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# the trainable IR
# ------------------------------------------------------------------------------------------------

class TrainableGraph(nn.Module):
    """The lipverify IR as a float32 torch module whose Dense/Conv weights and biases are parameters.

    ``trainable``: those nodes in graph order. ``const_factor``: product of the certified factors of
    every other unary node (activations, pooling, fixed scalings) - what the trained layers' norms
    are multiplied by in the product bound.
    """

    def __init__(self, graph):
        super().__init__()
        self.const_factor = 1.0
        for n in graph.nodes:
            if not n.is_merge and not isinstance(n.op, (Dense, Conv)):
                self.const_factor *= float(n.op.factor(graph.in_shape(n)).upper)
        self.graph = copy.deepcopy(graph).to(torch.float32)
        self.trainable = []
        for i, n in enumerate(self.graph.nodes):
            if isinstance(n.op, (Dense, Conv)):
                n.op.weight = nn.Parameter(n.op.weight.detach().clone().contiguous())
                self.register_parameter(f"w{i}", n.op.weight)
                if n.op.bias is not None:
                    n.op.bias = nn.Parameter(n.op.bias.detach().clone().contiguous())
                    self.register_parameter(f"b{i}", n.op.bias)
                self.trainable.append(n)
        if not self.trainable:
            raise UserInputError("the model has no dense or convolution layer to fine-tune")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph.forward(x)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

def _inputs_only(path: str, x_key: str, input_shape) -> torch.Tensor:
    """Unlabelled inputs (for --distill) from .npz / .pt files that have no label array."""
    p = Path(path)
    try:
        if p.suffix == ".npz":
            arch = np.load(path, allow_pickle=False)
            if x_key not in arch.files:
                raise UserInputError(f"{path}: no array named {x_key!r} (present: {', '.join(arch.files)}); choose it with --x-key")
            x = arch[x_key]
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            x = obj[x_key] if isinstance(obj, dict) else obj
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(f"{path}: cannot read inputs ({type(exc).__name__}: {exc})".split("\n")[0]) from None
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    want = tuple(input_shape)
    if tuple(x.shape[1:]) != want:
        if x.dim() >= 2 and int(np.prod(x.shape[1:])) == int(np.prod(want)) and (
                x.dim() == 2 or [d for d in x.shape[1:] if d != 1] == [d for d in want if d != 1]):
            x = x.reshape((x.shape[0],) + want)
        else:
            raise UserInputError(f"{path}: samples have shape {tuple(x.shape[1:])}, the model takes {want}")
    return x


def load_data(path: str, opts: FinetuneOptions, input_shape, n_classes: int | None, need_labels: bool):
    """(x float32, y int64 or None). Bad files, shapes or labels raise UserInputError (exit 2)."""
    from lipverify.data import DataSpec, load_all

    if not Path(path).exists():
        raise UserInputError(f"{path}: no such data file")
    spec = DataSpec(path=path, x_key=opts.x_key, y_key=opts.y_key, label_column=opts.label_column,
                    transform=opts.transform, limit=opts.limit, seed=opts.seed)
    try:
        x, y = load_all(spec, tuple(input_shape))
    except UserInputError as exc:
        if need_labels or "no " not in str(exc) or opts.y_key not in str(exc):
            if need_labels and opts.y_key in str(exc) and "no " in str(exc):
                raise UserInputError(f"{exc}. The data has no labels: pass --distill to fine-tune on the "
                                     "original model's outputs instead") from None
            raise
        return _inputs_only(path, opts.x_key, input_shape), None
    x = x.to(torch.float32)
    if x.shape[0] == 0:
        raise UserInputError(f"{path}: no samples")
    if not need_labels:
        return x, None
    y = torch.as_tensor(y).long().reshape(-1)
    if n_classes is None:
        raise UserInputError("labelled fine-tuning needs a classifier with a flat logit output; use --distill")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise UserInputError(f"{path}: labels must lie in 0..{n_classes - 1} for a model with {n_classes} outputs "
                             f"(found {int(y.min())}..{int(y.max())})")
    return x, y


def _predict(fn, x: torch.Tensor, batch: int = 512) -> np.ndarray:
    outs = [np.asarray(fn(x[i:i + batch].numpy())) for i in range(0, len(x), batch)]
    return np.concatenate(outs).reshape(len(x), -1)


def _accuracy(logits: np.ndarray, y: torch.Tensor | None) -> float | None:
    if y is None:
        return None
    return float((logits.argmax(1) == y.numpy()).mean())


def _certified_accuracy(logits: np.ndarray, y, L: float, eps: float) -> float | None:
    if y is None or logits.shape[1] < 2:
        return None
    from lipverify.radii import compute_radii

    r = compute_radii(logits, y.numpy(), L, None, [eps])
    return float(np.mean(r.certified_at[float(eps)]))


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserInputError(f"--resume: no checkpoint at {path}") from None
    except Exception as exc:
        raise UserInputError(f"{path}: not a readable fine-tune checkpoint ({type(exc).__name__})") from None


@contextlib.contextmanager
def _deterministic(seed: int):
    """One thread and a seeded global generator for the duration of the run (restored after)."""
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)


@contextlib.contextmanager
def _sigint_flag():
    """Turn Ctrl-C into a flag checked between steps, so the checkpoint is always a clean state."""
    flag = {"hit": False}
    try:
        old = signal.signal(signal.SIGINT, lambda *a: flag.__setitem__("hit", True))
    except ValueError:  # not the main thread
        old = None
    try:
        yield flag
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------

def _certify_file(path: Path, opts: FinetuneOptions, fmt: str, input_shape, track=None) -> dict:
    from lipverify.certify import CertifyOptions, certify

    try:  # the tightest certifier that has landed registers itself at import
        import lipverify.bounds.lipsdp  # noqa: F401
    except ImportError:
        pass
    copts = CertifyOptions(method=opts.certify_method, input_shape=tuple(input_shape),
                           spec=str(ex.spec_path_for(path)) if fmt == "safetensors" else None,
                           seed=opts.seed, lower_starts=opts.lower_starts, lower_budget_s=opts.lower_budget_s,
                           device="cpu")
    return certify(path, copts, track=track)


def finetune(model_path, out_path=None, opts: FinetuneOptions | None = None,
             report: Callable[..., None] | None = None, on_step: Callable[[int, int], None] | None = None,
             track=None) -> FinetuneResult:
    """Fine-tune ``model_path`` until its certified L is at most ``opts.target_L``; see module docstring.

    ``report(event, **info)`` receives progress events: "start" (epochs, steps), "epoch_start" (epoch),
    "step" (epoch, step, loss), "epoch_end" (epoch, loss, acc, L, L_kind), "certify" (stage). ``on_step(epoch,
    step)`` is called after every completed step (tests use it to simulate Ctrl-C).
    """
    from lipverify.certify import build_graph
    from lipverify.load.model import load_model

    if opts is None:
        raise UserInputError("fine-tune needs options (at least the target L)")
    report = report or (lambda event, **info: None)
    target = float(opts.target_L)
    if not (math.isfinite(target) and target > 0):
        raise UserInputError(f"--target-L must be a positive number, got {opts.target_L}")
    if opts.epochs < 0 or opts.batch_size < 1 or not opts.lr > 0:
        raise UserInputError("--epochs must be >= 0, --batch-size >= 1 and --lr > 0")
    if not opts.data:
        raise UserInputError("--data is required (training inputs; labels too unless --distill)")
    model_path = Path(model_path)

    loaded = load_model(model_path, opts.input_shape, opts.spec, opts.activation, None)
    fmt = loaded.format
    if fmt not in ("onnx", "torchscript", "safetensors"):
        raise UserInputError(f"fine-tune writes ONNX, TorchScript or safetensors; {fmt!r} input is not supported")
    out = Path(out_path) if out_path else ex.default_out_path(model_path, target)
    ex.check_out_path(model_path, out, fmt, opts.force)
    cert_path = Path(opts.certificate) if opts.certificate else ex.certificate_path_for(out)
    ckpt_path = Path(opts.checkpoint) if opts.checkpoint else out.with_suffix(out.suffix + ".ckpt")

    graph, check = build_graph(loaded)
    input_shape = tuple(graph.input_shape)
    out_shape = tuple(graph.output_shape)
    n_classes = out_shape[0] if len(out_shape) == 1 and out_shape[0] >= 2 else None

    x_tr, y_tr = load_data(opts.data, opts, input_shape, n_classes, need_labels=not opts.distill)
    if opts.val:
        try:  # validation labels give accuracies; with --distill they are optional
            x_va, y_va = load_data(opts.val, opts, input_shape, n_classes, need_labels=n_classes is not None)
        except UserInputError:
            if not opts.distill:
                raise
            x_va, y_va = load_data(opts.val, opts, input_shape, n_classes, need_labels=False)
        val_name = opts.val
    else:
        x_va, y_va, val_name = x_tr, y_tr, f"{opts.data} (training data: no --val given)"

    tensors = entries = metadata = None
    if fmt == "safetensors":
        from lipverify.load.spec import read_safetensors

        tensors = read_safetensors(model_path)
        metadata = ex.read_metadata(model_path)

    with _deterministic(opts.seed):
        tg = TrainableGraph(graph)
        if fmt == "safetensors":
            entries = ex.map_spec(tg.trainable, loaded.spec, tensors)
        # the function before training is the user's (self-check of the IR already passed; this
        # checks the float32 trainable copy too)
        with torch.no_grad():
            ref = _predict(loaded.reference, x_va[:64])
            mine = tg(x_va[:64]).numpy().reshape(len(ref), -1)
        scale = max(1.0, float(np.abs(ref).max()))
        if not np.allclose(ref, mine, atol=1e-4 * scale, rtol=1e-4):
            raise UserInputError("the trainable copy of the network does not reproduce the model "
                                 f"(max difference {float(np.abs(ref - mine).max()):.3g}); cannot fine-tune it")
        logits_before = _predict(loaded.reference, x_va)
        acc_before = _accuracy(logits_before, y_va if n_classes else None)
        teacher = torch.from_numpy(_predict(loaded.reference, x_tr)).float() if opts.distill else None

        history, t_train = _train(tg, opts, target, x_tr, y_tr, teacher, loaded.sha256, ckpt_path, report, on_step)

    # export, certify from disk, correct if needed
    files = ex.write_model(fmt, tg, input_shape, out, tensors=tensors, entries=entries, spec=loaded.spec,
                           metadata=metadata)
    report("certify", stage="exported file")
    cert = _certify_file(out, opts, fmt, input_shape, track)
    L_trained = float(cert["certified_bound"])
    loaded_out = load_model(out, input_shape, str(ex.spec_path_for(out)) if fmt == "safetensors" else None)
    logits_trained = _predict(loaded_out.reference, x_va)
    acc_trained = _accuracy(logits_trained, y_va if n_classes else None)
    corrections = []
    L = L_trained
    for _ in range(4):
        if L <= target:
            break
        factor = target / L * (1.0 - 1e-6)
        how = ex.scale_last_layer(tg, factor)
        files = ex.write_model(fmt, tg, input_shape, out, tensors=tensors, entries=entries, spec=loaded.spec,
                               metadata=metadata)
        report("certify", stage="after final correction")
        cert = _certify_file(out, opts, fmt, input_shape, track)
        corrections.append({"certified_before": L, "factor": factor, "how": how,
                            "certified_after": float(cert["certified_bound"])})
        L = float(cert["certified_bound"])
    loaded_out = load_model(out, input_shape, str(ex.spec_path_for(out)) if fmt == "safetensors" else None)
    logits_after = _predict(loaded_out.reference, x_va)
    acc_after = _accuracy(logits_after, y_va if n_classes else None)

    # the original model's certified bound, for the table (same certifier, same settings); cached
    # per process by file hash so sweeps over targets certify the source once
    key = (loaded.sha256, opts.certify_method, opts.seed, opts.lower_starts, opts.lower_budget_s, tuple(input_shape))
    if key not in _SOURCE_CERTS:
        _SOURCE_CERTS[key] = _certify_file(model_path, opts, fmt, input_shape, track)
    cert_orig = _SOURCE_CERTS[key]
    L_orig = float(cert_orig["certified_bound"])
    y_eval = y_va if n_classes else None
    finetune_section = {
        "source": {"path": str(model_path), "sha256": loaded.sha256, "format": fmt,
                   "certified_bound": L_orig, "method": cert_orig["method"]},
        "output": {"path": str(out), "sha256": loaded_out.sha256, "files": [str(f) for f in files]},
        "target_L": target,
        "target_met": L <= target,
        "method": opts.method,
        "batchnorm": ("folded into the adjacent convolution before training (lipverify.graph.simplify)"
                      if any(n.op_type == "BatchNormalization" for n in loaded.onnx_model.graph.node) else None),
        "certified_accuracy_form": "global",  # radius margin / (sqrt(2) L) from the certified L
        "settings": opts.settings(),
        "seed": opts.seed,
        "validation": val_name,
        "accuracy_before": acc_before,
        "accuracy_trained": acc_trained,
        "accuracy_after": acc_after,
        "certified_bound_trained": L_trained,
        "final_correction": corrections,
        "final_correction_accuracy_cost": (None if acc_trained is None or acc_after is None
                                           else acc_trained - acc_after),
        "eps": opts.eps,
        "certified_accuracy_before": _certified_accuracy(logits_before, y_eval, L_orig, opts.eps),
        "certified_accuracy_after": _certified_accuracy(logits_after, y_eval, L, opts.eps),
        "history": history,
        "train_seconds": t_train,
    }
    cert = dict(cert)
    cert["fine_tune"] = finetune_section
    write_json(cert_path, cert)
    if ckpt_path.exists():
        ckpt_path.unlink()
    return FinetuneResult(out, cert_path, cert, L <= target, files)


def _train(tg, opts, target, x, y, teacher, sha, ckpt_path, report, on_step):
    """The training loop (deterministic, checkpointed). Returns (history, seconds)."""
    method = make_method(opts.method, tg, target, opts, opts.seed)
    groups = [{"params": list(tg.parameters()), "lr": opts.lr}]
    extra = method.parameters()
    if extra:
        groups.append({"params": extra, "lr": max(opts.lr, 1e-2)})
    optimizer = torch.optim.Adam(groups)
    n = len(x)
    steps = math.ceil(n / opts.batch_size)
    settings = opts.settings()
    start_epoch, start_step, history = 0, 0, []
    running = {"loss": 0.0, "correct": 0, "seen": 0}
    seconds = 0.0
    if opts.resume:
        state = load_checkpoint(ckpt_path)
        if state.get("version") != CHECKPOINT_VERSION or state.get("input_sha256") != sha:
            raise UserInputError(f"{ckpt_path}: this checkpoint belongs to another model or lipverify version")
        if state.get("settings") != settings:
            diff = sorted(k for k in settings if settings[k] != state["settings"].get(k))
            raise UserInputError(f"{ckpt_path}: the checkpoint was made with other settings ({', '.join(diff)}); "
                                 "resume with the same options")
        tg.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        method.load_state_dict(state["method"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        history, running, seconds = list(state["history"]), dict(state["running"]), float(state["seconds"])

    def checkpoint(epoch, step):
        save_checkpoint(ckpt_path, {
            "version": CHECKPOINT_VERSION, "input_sha256": sha, "settings": settings,
            "model": tg.state_dict(), "optimizer": optimizer.state_dict(), "method": method.state_dict(),
            "epoch": epoch, "step": step, "history": history, "running": running, "seconds": seconds})

    report("start", epochs=opts.epochs, steps=steps, start_epoch=start_epoch)
    with _sigint_flag() as flag:
        epoch, step = start_epoch, start_step
        try:
            for epoch in range(start_epoch, opts.epochs):
                report("epoch_start", epoch=epoch, step=step if epoch == start_epoch else 0)
                order = torch.randperm(n, generator=torch.Generator().manual_seed(opts.seed * 100_003 + epoch))
                first = start_step if epoch == start_epoch else 0
                if first == 0:
                    running = {"loss": 0.0, "correct": 0, "seen": 0}
                for step in range(first, steps):
                    t0 = time.perf_counter()
                    idx = order[step * opts.batch_size:(step + 1) * opts.batch_size]
                    xb = x[idx]
                    out = tg(xb)
                    if teacher is not None:
                        task = F.kl_div(F.log_softmax(out, 1), F.log_softmax(teacher[idx], 1), log_target=True,
                                        reduction="batchmean") if out.dim() == 2 and out.shape[1] > 1 else F.mse_loss(out, teacher[idx])
                    else:
                        task = F.cross_entropy(out, y[idx])
                    global_step = epoch * steps + step
                    pen = method.penalty(global_step)
                    loss = task if pen is None else task + pen
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    method.after_step(global_step)
                    seconds += time.perf_counter() - t0
                    running["loss"] += float(task.detach()) * len(idx)
                    running["seen"] += len(idx)
                    if y is not None:
                        running["correct"] += int((out.detach().argmax(1) == y[idx]).sum())
                    report("step", epoch=epoch, step=step, loss=float(loss.detach()))
                    if on_step is not None:
                        on_step(epoch, step)
                    if flag["hit"]:
                        raise KeyboardInterrupt
                t0 = time.perf_counter()
                method.end_epoch(epoch)
                seconds += time.perf_counter() - t0
                L_est, kind = method.estimate()
                row = {"epoch": epoch, "loss": running["loss"] / max(running["seen"], 1),
                       "train_accuracy": running["correct"] / running["seen"] if y is not None and running["seen"] else None,
                       "L": L_est, "L_kind": kind}
                history.append(row)
                step = 0
                start_step = 0
                checkpoint(epoch + 1, 0)
                report("epoch_end", **row)
        except KeyboardInterrupt:
            # the interrupted step either completed (on_step/flag) or never touched the weights
            # (an exception inside a step before optimizer.step): resume at the next step.
            done = step + 1 if _step_completed(optimizer, epoch, step, steps) else step
            checkpoint(epoch, done)
            raise TrainingInterrupted(f"interrupted; checkpoint saved to {ckpt_path} (continue with --resume)") from None
    method.finalize()
    return history, seconds


def _step_completed(optimizer, epoch, step, steps) -> bool:
    """Whether Adam counted step (epoch, step): its per-parameter step counter says so exactly."""
    for st in optimizer.state.values():
        if "step" in st:
            return int(float(st["step"])) >= epoch * steps + step + 1
    return False
