"""``lipverify fine-tune``: retrain a model until a target Lipschitz bound is certified.

What is trained: the lipverify IR of the model (the graph ``certify`` extracts and bounds), with
the weights and biases of its Dense and Conv nodes turned into ``nn.Parameter``s. BatchNorm is
therefore *folded* into the adjacent convolution before training (``graph.simplify``), never
trained as such; input normalization and other fixed scalings stay fixed. Training the IR means
the penalty acts on exactly the operators the certificate bounds, whatever the input format.

Pipeline: load -> extract IR -> data checks -> accuracy of the original -> train (task loss from
losses.py + method penalty / projection, checkpoints; data-parallel under torchrun, see
distributed.py) -> export in the input's format -> ``certify`` the exported file from disk -> if
its certified L still exceeds the target, the last resort: an exact output rescale by target/L
(re-export, re-certify; recorded as ``rescale_factor``) -> accuracy and certified accuracy of the
exported file -> certificate JSON beside it.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from lipverify.errors import LipverifyError, UserInputError
from lipverify.fileio import atomic_write_bytes, write_json
from lipverify.finetune import export as ex
from lipverify.finetune.methods import make_method
from lipverify.ops.conv import Conv
from lipverify.ops.dense import Dense

CHECKPOINT_VERSION = 2
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
    eps: float = 0.1  # certified accuracy is reported at this radius (and the margin loss trains for it)
    more_eps: tuple[float, ...] = ()  # further radii at which certified accuracy is reported
    # task loss (losses.py): "auto" = the method's default (margin for rslmi/lip-loop, ce for project)
    loss: str = "auto"
    beta: float | None = None  # None: DEFAULT_BETA_EPS / margin_eps (16 at eps 0.1)
    margin_eps: float | None = None  # None: train for the reported radius eps
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
    sketch_every: int = 4  # rslmi: steps that share one sketch (and one power iteration)
    penalty_every: int = 4  # rslmi: the penalty is evaluated every k steps, with weight k
    alpha: float = 0.3
    alpha_growth: float = 1.0
    tau_weight: float = 0.0
    warm_start: str = "clip"  # rslmi start: "clip" (SVD clip to the budgets) or "scale" (rescale, same argmax)
    rho: float = 0.3
    rho_growth: float = 1.0
    admm_every: int = 10
    # certification of the exported file
    device: str = "cpu"  # training device: cpu, cuda or auto (certification always runs on the CPU)
    certify_method: str = "auto"
    lower_starts: int = 8
    lower_budget_s: float | None = None
    # files
    checkpoint: str | None = None
    resume: bool = False
    certificate: str | None = None

    def settings(self) -> dict:
        d = asdict(self)
        for k in ("checkpoint", "resume", "certificate"):
            d.pop(k)
        d["input_shape"] = list(self.input_shape) if self.input_shape else None
        d["more_eps"] = list(self.more_eps)
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

    device = torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph.forward(x)

    def move(self, device) -> "TrainableGraph":
        """Put every tensor of the IR on ``device``. Parameters keep their identity (the graph's
        ops, the optimizer and the methods refer to them), so only their data moves."""
        device = torch.device(device)
        for n in self.graph.nodes:
            for name, value in vars(n.op).items():
                if isinstance(value, nn.Parameter):
                    value.data = value.data.to(device)
                elif isinstance(value, torch.Tensor):
                    setattr(n.op, name, value.to(device))
        self.device = device
        return self


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
    """One thread, seeded global generators and deterministic cuDNN kernels for the duration of
    the run (restored after). On a GPU, same seed => same numbers holds on the same GPU model and
    software versions (floating-point reduction orders differ between devices)."""
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


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

    copts = CertifyOptions(method=opts.certify_method, input_shape=tuple(input_shape),
                           spec=str(ex.spec_path_for(path)) if fmt == "safetensors" else None,
                           seed=opts.seed, lower_starts=opts.lower_starts, lower_budget_s=opts.lower_budget_s,
                           device="cpu")
    return certify(path, copts, track=track)


def _source_certificate(model_path: Path, sha: str, opts: FinetuneOptions, fmt: str, input_shape, track) -> dict:
    """The original model's certificate (same certifier, same settings); cached per process by
    file hash, so sweeps over targets certify the source once."""
    key = (sha, opts.certify_method, opts.seed, opts.lower_starts, opts.lower_budget_s, tuple(input_shape))
    if key not in _SOURCE_CERTS:
        _SOURCE_CERTS[key] = _certify_file(model_path, opts, fmt, input_shape, track)
    return _SOURCE_CERTS[key]


def _validate(opts: FinetuneOptions) -> float:
    from lipverify.finetune.losses import LOSSES
    from lipverify.finetune.methods import METHODS

    if opts is None:
        raise UserInputError("fine-tune needs options (at least the target L)")
    target = float(opts.target_L)
    if not (math.isfinite(target) and target > 0):
        raise UserInputError(f"--target-L must be a positive number, got {opts.target_L}")
    if opts.epochs < 0 or opts.batch_size < 1 or not opts.lr > 0:
        raise UserInputError("--epochs must be >= 0, --batch-size >= 1 and --lr > 0")
    if opts.method not in METHODS:
        raise UserInputError(f"unknown --method {opts.method!r}; choose one of rslmi, lip-loop, project, plain")
    if opts.loss not in LOSSES:
        raise UserInputError(f"--loss {opts.loss!r}: choose one of {', '.join(LOSSES)}")
    if any(not (math.isfinite(e) and e >= 0) for e in (opts.eps, *opts.more_eps)):
        raise UserInputError("--eps values must be finite and >= 0")
    if opts.device not in ("cpu", "cuda", "auto"):
        raise UserInputError(f"--device {opts.device!r}: expected cpu, cuda or auto")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda requested but no CUDA device is available (use --device auto or cpu)")
    if opts.sketch_every < 1 or opts.penalty_every < 1:
        raise UserInputError("--sketch-every and --penalty-every must be >= 1")
    if not opts.data:
        raise UserInputError("--data is required (training inputs; labels too unless --distill)")
    return target


@dataclass
class _Run:
    """Everything loaded and checked before training starts."""

    model_path: Path
    loaded: object
    fmt: str
    graph: object
    input_shape: tuple
    n_classes: int | None
    x_tr: torch.Tensor
    y_tr: torch.Tensor | None
    x_va: torch.Tensor
    y_va: torch.Tensor | None
    val_name: str
    tensors: dict | None = None
    metadata: dict | None = None


def _prepare(model_path, opts: FinetuneOptions) -> _Run:
    from lipverify.certify import build_graph
    from lipverify.load.model import load_model

    model_path = Path(model_path)
    loaded = load_model(model_path, opts.input_shape, opts.spec, opts.activation, None)
    fmt = loaded.format
    if fmt not in ("onnx", "torchscript", "safetensors"):
        raise UserInputError(f"fine-tune writes ONNX, TorchScript or safetensors; {fmt!r} input is not supported")
    graph, _check = build_graph(loaded)
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
    run = _Run(model_path, loaded, fmt, graph, input_shape, n_classes, x_tr, y_tr, x_va, y_va, val_name)
    if fmt == "safetensors":
        from lipverify.load.spec import read_safetensors

        run.tensors = read_safetensors(model_path)
        run.metadata = ex.read_metadata(model_path)
    return run


def _trainable(run: _Run) -> TrainableGraph:
    """The float32 trainable copy, checked against the user's model on validation inputs (the IR's
    self-check already passed; this checks the copy too)."""
    tg = TrainableGraph(run.graph)
    with torch.no_grad():
        ref = _predict(run.loaded.reference, run.x_va[:64])
        mine = tg(run.x_va[:64]).numpy().reshape(len(ref), -1)
    scale = max(1.0, float(np.abs(ref).max()))
    if not np.allclose(ref, mine, atol=1e-4 * scale, rtol=1e-4):
        raise UserInputError("the trainable copy of the network does not reproduce the model "
                             f"(max difference {float(np.abs(ref - mine).max()):.3g}); cannot fine-tune it")
    return tg


def _task_loss(run: _Run, opts: FinetuneOptions, target: float, teacher_L: float | None):
    from lipverify.finetune.losses import TaskLoss, default_beta
    from lipverify.finetune.methods import default_loss

    kind = default_loss(opts.method) if opts.loss == "auto" else opts.loss
    margin_eps = opts.eps if opts.margin_eps is None else opts.margin_eps
    return TaskLoss(kind, target, default_beta(margin_eps) if opts.beta is None else opts.beta, margin_eps, teacher_L)


def finetune(model_path, out_path=None, opts: FinetuneOptions | None = None,
             report: Callable[..., None] | None = None, on_step: Callable[[int, int], None] | None = None,
             track=None) -> FinetuneResult | None:
    """Fine-tune ``model_path`` until its certified L is at most ``opts.target_L``; see module docstring.

    ``report(event, **info)`` receives progress events: "start" (epochs, steps), "epoch_start" (epoch),
    "step" (epoch, step, loss), "epoch_end" (epoch, loss, acc, L, L_kind), "certify" (stage). ``on_step(epoch,
    step)`` is called after every completed step (tests use it to simulate Ctrl-C).

    Under torchrun (WORLD_SIZE > 1) every rank trains its share of each batch (distributed.py);
    rank 0 exports and certifies and returns the result, the other ranks return None.
    """
    from lipverify.finetune import distributed

    target = _validate(opts)
    report = report or (lambda event, **info: None)
    model_path = Path(model_path)
    run = _prepare(model_path, opts)
    out = Path(out_path) if out_path else ex.default_out_path(model_path, target)
    cert_path = Path(opts.certificate) if opts.certificate else ex.certificate_path_for(out)
    ckpt_path = Path(opts.checkpoint) if opts.checkpoint else out.with_suffix(out.suffix + ".ckpt")
    ex.check_out_paths(model_path, run.fmt, out, cert_path, ckpt_path, opts.spec, (opts.data, opts.val))
    dist = distributed.from_env(opts.device)
    try:
        teacher_L = None
        if opts.distill and run.n_classes is not None:  # the margin loss normalizes the teacher by its L
            teacher_L = _shared_source_L(run, opts, dist, track)
        with _deterministic(opts.seed):
            tg = _trainable(run)
            entries = ex.map_spec(tg.trainable, run.loaded.spec, run.tensors) if run.fmt == "safetensors" else None
            logits_before = _predict(run.loaded.reference, run.x_va)
            teacher = torch.from_numpy(_predict(run.loaded.reference, run.x_tr)).float() if opts.distill else None
            loss_fn = _task_loss(run, opts, target, teacher_L)
            tg.move(dist.device)
            history, t_train = _train(tg, opts, target, run.x_tr, run.y_tr, teacher, loss_fn, run.loaded.sha256,
                                      ckpt_path, report if dist.main else (lambda event, **info: None), on_step, dist)
            tg.move("cpu")
        if not dist.main:
            dist.barrier()
            return None
        result = _export_and_certify(run, opts, target, tg, entries, out, cert_path, ckpt_path, logits_before,
                                     history, t_train, loss_fn, report, track)
        dist.barrier()
        return result
    finally:
        dist.close()


def _shared_source_L(run: _Run, opts, dist, track) -> float:
    """The source's certified L, computed on rank 0 and sent to the other ranks."""
    L = [None]
    if dist.main:
        L[0] = float(_source_certificate(run.model_path, run.loaded.sha256, opts, run.fmt, run.input_shape,
                                         track)["certified_bound"])
    if dist.active:
        import torch.distributed as tdist

        tdist.broadcast_object_list(L, src=0)
    return float(L[0])


def _export_and_certify(run: _Run, opts, target, tg, entries, out, cert_path, ckpt_path, logits_before,
                        history, t_train, loss_fn, report, track) -> FinetuneResult:
    """Export, certify the file from disk, correct if needed, write the certificate JSON."""
    from lipverify.load.model import load_model

    fmt, input_shape = run.fmt, run.input_shape
    spec_out = str(ex.spec_path_for(out)) if fmt == "safetensors" else None

    def write():
        return ex.write_model(fmt, tg, input_shape, out, tensors=run.tensors, entries=entries, spec=run.loaded.spec,
                              metadata=run.metadata)

    files = write()
    report("certify", stage="exported file")
    cert = _certify_file(out, opts, fmt, input_shape, track)
    L_trained = float(cert["certified_bound"])
    y_eval = run.y_va if run.n_classes else None
    acc_trained = _accuracy(_predict(load_model(out, input_shape, spec_out).reference, run.x_va), y_eval)
    corrections = []
    L = L_trained
    rescale = 1.0
    for _ in range(4):  # the last resort: an exact output rescale (argmax and radii unchanged)
        if L <= target:
            break
        factor = target / L * (1.0 - 1e-6)
        how = ex.scale_last_layer(tg, factor)
        rescale *= factor
        files = write()
        report("certify", stage="after final correction")
        cert = _certify_file(out, opts, fmt, input_shape, track)
        corrections.append({"certified_before": L, "factor": factor, "how": how,
                            "certified_after": float(cert["certified_bound"])})
        L = float(cert["certified_bound"])
    loaded_out = load_model(out, input_shape, spec_out)
    logits_after = _predict(loaded_out.reference, run.x_va)
    acc_after = _accuracy(logits_after, y_eval)

    cert_orig = _source_certificate(run.model_path, run.loaded.sha256, opts, fmt, input_shape, track)
    L_orig = float(cert_orig["certified_bound"])
    finetune_section = {
        "source": {"path": str(run.model_path), "sha256": run.loaded.sha256, "format": fmt,
                   "certified_bound": L_orig, "method": cert_orig["method"]},
        "output": {"path": str(out), "sha256": loaded_out.sha256, "files": [str(f) for f in files]},
        "target_L": target,
        "target_met": L <= target,
        "method": opts.method,
        "loss": {"kind": loss_fn.kind, "beta": loss_fn.beta, "margin_eps": loss_fn.offset / math.sqrt(2.0)},
        "batchnorm": ("folded into the adjacent convolution before training (lipverify.graph.simplify)"
                      if any(n.op_type == "BatchNormalization" for n in run.loaded.onnx_model.graph.node) else None),
        "certified_accuracy_form": "global",  # radius margin / (sqrt(2) L) from the certified L
        "settings": opts.settings(),
        "seed": opts.seed,
        "validation": run.val_name,
        "accuracy_before": _accuracy(logits_before, y_eval),
        "accuracy_trained": acc_trained,
        "accuracy_after": acc_after,
        "certified_bound_trained": L_trained,
        "final_correction": corrections,
        "rescale_factor": rescale,
        "final_correction_accuracy_cost": (None if acc_trained is None or acc_after is None
                                           else acc_trained - acc_after),
        "eps": opts.eps,
        "certified_accuracy_before": _certified_accuracy(logits_before, y_eval, L_orig, opts.eps),
        "certified_accuracy_after": _certified_accuracy(logits_after, y_eval, L, opts.eps),
        "certified_accuracy": {f"{e:g}": {"before": _certified_accuracy(logits_before, y_eval, L_orig, e),
                                          "after": _certified_accuracy(logits_after, y_eval, L, e)}
                               for e in dict.fromkeys([opts.eps, *opts.more_eps])},
        "history": history,
        "train_seconds": t_train.wall,
        "train_cpu_seconds": t_train.cpu,
    }
    cert = dict(cert)
    cert["fine_tune"] = finetune_section
    write_json(cert_path, cert)
    if ckpt_path.exists():
        ckpt_path.unlink()
    return FinetuneResult(out, cert_path, cert, L <= target, files)


def time_training(model_path, opts: FinetuneOptions) -> dict:
    """Train without exporting or certifying (benchmarks: seconds per epoch of each method).

    Returns {"seconds", "cpu_seconds": training time including the method's setup, "history": per epoch}."""
    from lipverify.finetune import distributed

    target = _validate(opts)
    run = _prepare(Path(model_path), opts)
    with _deterministic(opts.seed):
        tg = _trainable(run).move(distributed.resolve_device(opts.device))
        loss_fn = _task_loss(run, opts, target, None)
        history, clock = _train(tg, replace(opts, resume=False), target, run.x_tr, run.y_tr, None, loss_fn,
                                run.loaded.sha256, None, lambda event, **info: None, None, None)
    return {"seconds": clock.wall, "cpu_seconds": clock.cpu, "history": history}


def _train(tg, opts, target, x, y, teacher, loss_fn, sha, ckpt_path, report, on_step, dist):
    """The training loop (deterministic, checkpointed, optionally data-parallel).

    Returns (history, clock): the clock holds the seconds of training proper (wall and CPU), the
    method's setup, per-epoch work and finalization included, checkpoints and progress excluded."""
    from lipverify.finetune.distributed import Dist

    dist = dist or Dist(device=str(tg.device))
    device = tg.device
    x = x.to(device)
    y = None if y is None else y.to(device)
    teacher = None if teacher is None else teacher.to(device)
    clock = Stopwatch()
    with clock:
        method = make_method(opts.method, tg, target, opts, opts.seed)
        model = dist.wrap(tg)
        groups = [{"params": list(tg.parameters()), "lr": opts.lr}]
        extra = method.parameters()
        if extra:
            groups.append({"params": extra, "lr": max(opts.lr, 1e-2)})
        optimizer = torch.optim.Adam(groups)
    n = len(x)
    steps = math.ceil(n / opts.batch_size)
    settings = opts.settings()
    start_epoch, start_step, history = 0, 0, []
    running = _fresh_running()
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
        history, running = list(state["history"]), dict(state["running"])
        clock.load(state["clock"])

    def checkpoint(epoch, step):
        if ckpt_path is None or not dist.main:
            return
        save_checkpoint(ckpt_path, {
            "version": CHECKPOINT_VERSION, "input_sha256": sha, "settings": settings,
            "model": tg.state_dict(), "optimizer": optimizer.state_dict(), "method": method.state_dict(),
            "epoch": epoch, "step": step, "history": history, "running": running, "clock": clock.state()})

    report("start", epochs=opts.epochs, steps=steps, start_epoch=start_epoch)
    with _sigint_flag() as flag:
        epoch, step = start_epoch, start_step
        try:
            for epoch in range(start_epoch, opts.epochs):
                report("epoch_start", epoch=epoch, step=step if epoch == start_epoch else 0)
                order = torch.randperm(n, generator=torch.Generator().manual_seed(opts.seed * 100_003 + epoch))
                first = start_step if epoch == start_epoch else 0
                if first == 0:
                    running = _fresh_running()
                for step in range(first, steps):
                    step_clock = Stopwatch()
                    clock.start()
                    step_clock.start()
                    batch = order[step * opts.batch_size:(step + 1) * opts.batch_size]
                    idx = dist.shard(batch).to(device)
                    out = model(x[idx])
                    per_sample = loss_fn(out, None if y is None else y[idx], None if teacher is None else teacher[idx],
                                         method.loss_scale())
                    # sum / global batch size, times the world size that DDP's gradient average divides by
                    task = per_sample.sum() * (dist.world / len(batch))
                    global_step = epoch * steps + step
                    pen = method.penalty(global_step)
                    loss = task if pen is None else task + pen
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    method.after_step(global_step)
                    clock.stop()
                    step_clock.stop()
                    running["seconds"] += step_clock.wall
                    running["cpu_seconds"] += step_clock.cpu
                    running["loss"] += float(per_sample.detach().sum())
                    running["seen"] += len(idx)
                    if y is not None:
                        running["correct"] += int((out.detach().argmax(1) == y[idx]).sum())
                    report("step", epoch=epoch, step=step, loss=float(loss.detach()))
                    if on_step is not None:
                        on_step(epoch, step)
                    if dist.any(flag["hit"]):
                        raise KeyboardInterrupt
                epoch_clock = Stopwatch()
                with clock, epoch_clock:
                    method.end_epoch(epoch)
                running["seconds"] += epoch_clock.wall
                running["cpu_seconds"] += epoch_clock.cpu
                L_est, kind = method.estimate()
                row = {"epoch": epoch, "loss": running["loss"] / max(running["seen"], 1),
                       "train_accuracy": running["correct"] / running["seen"] if y is not None and running["seen"] else None,
                       "L": L_est, "L_kind": kind, "seconds": running["seconds"],
                       "cpu_seconds": running["cpu_seconds"]}
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
    with clock:
        method.finalize()
    return history, clock


def _fresh_running() -> dict:
    return {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0, "cpu_seconds": 0.0}


class Stopwatch:
    """Accumulated wall-clock and process CPU seconds (CPU time is what the benchmark compares:
    on a shared machine other jobs inflate wall time, not this process's CPU time)."""

    def __init__(self):
        self.wall = self.cpu = 0.0
        self._t = None

    def start(self) -> None:
        self._t = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        w, c = self._t
        self.wall += time.perf_counter() - w
        self.cpu += time.process_time() - c

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def state(self) -> dict:
        return {"wall": self.wall, "cpu": self.cpu}

    def load(self, state: dict) -> None:
        self.wall, self.cpu = float(state["wall"]), float(state["cpu"])


def _step_completed(optimizer, epoch, step, steps) -> bool:
    """Whether Adam counted step (epoch, step): its per-parameter step counter says so exactly."""
    for st in optimizer.state.values():
        if "step" in st:
            return int(float(st["step"])) >= epoch * steps + step + 1
    return False
