"""``lipverify fine-tune``: parse, call :func:`lipverify.finetune.finetune`, render with rich.

Registered by cli.py as ``app.command("fine-tune")(fine_tune)``. Exit codes: 0 target met, 1 target
not met (the final correction makes this unexpected), 2 bad input, 3 soundness failure, 130 Ctrl-C
(a checkpoint was saved; rerun with --resume).
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from lipverify.errors import LipverifyError
from lipverify.report.numbers import fmt_pct, fmt_up, gate_check

out = Console()
err = Console(stderr=True)

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_SOUNDNESS = 0, 1, 2, 3


class _Reporter:
    """Progress bar per epoch (loss, accuracy, current L estimate) on stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = None
        self.task = None
        self.epochs = 0

    def __enter__(self):
        if self.enabled:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                     TimeElapsedColumn(), console=err)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def __call__(self, event: str, **info):
        if self.progress is None:
            return
        p = self.progress
        if event == "start":
            self.epochs, self.steps = info["epochs"], info["steps"]
        elif event == "epoch_start":
            self.task = p.add_task(f"epoch {info['epoch'] + 1}/{self.epochs}", total=self.steps,
                                   completed=info.get("step", 0), info="")
        elif event == "step" and self.task is not None:
            p.update(self.task, advance=1, info=f"loss {info['loss']:.4f}")
        elif event == "epoch_end" and self.task is not None:
            acc = info.get("train_accuracy")
            text = f"loss {info['loss']:.4f}" + (f"  acc {acc:.4f}" if acc is not None else "") + \
                f"  L {info['L']:.4g} ({info['L_kind']})"
            p.update(self.task, completed=self.steps, info=text)
        elif event == "certify":
            err.print(f"certifying the {info['stage']} ...")


def _fmt(v, pct=False):
    """Accuracies round down, certified bounds up (never more optimistic than the certificate)."""
    if v is None:
        return "-"
    return fmt_pct(v) if pct else fmt_up(v)


def render_finetune(cert: dict, console: Console) -> None:
    ft = cert["fine_tune"]
    table = Table(title=f"fine-tune ({ft['method']}, target L = {ft['target_L']:g})")
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("fine-tuned", justify="right")
    table.add_row("accuracy", _fmt(ft["accuracy_before"], True), _fmt(ft["accuracy_after"], True))
    table.add_row("certified L", _fmt(ft["source"]["certified_bound"]), _fmt(cert["certified_bound"]))
    form = ft.get("certified_accuracy_form", "global")
    for e, v in ft["certified_accuracy"].items():
        table.add_row(f"certified accuracy at ε={e} ({form} radii)", _fmt(v["before"], True), _fmt(v["after"], True))
    table.add_row("certified by", ft["source"]["method"], cert["method"])
    console.print(table)
    for c in ft["final_correction"]:
        console.print(f"final correction: certified L {fmt_up(c['certified_before'])} > target; {c['how']} "
                      f"-> {fmt_up(c['certified_after'])}", highlight=False)
    if ft["final_correction"]:
        cost = ft["final_correction_accuracy_cost"]
        console.print(f"accuracy cost of the correction: {_fmt(cost, True)}; total output rescale "
                      f"{ft['rescale_factor']:.6g}")
    else:
        console.print("training met the target by itself (no output rescale)")
    console.print(f"wrote {', '.join(ft['output']['files'])} (sha256 {ft['output']['sha256'][:16]}…)")
    console.print(f"validation data: {ft['validation']}", highlight=False)
    if ft.get("batchnorm"):
        console.print(f"BatchNorm: {ft['batchnorm']}", highlight=False)
    console.print(f"certified accuracies use {form} radii (margin / (√2 L)); `lipverify certify --data` "
                  "reports pairwise radii, which are never smaller", highlight=False)


def _parse_eps(text: str) -> list[float]:
    from lipverify.errors import UserInputError

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserInputError(f"--eps {text!r}: expected a number or comma-separated numbers") from None
    if not values:
        raise UserInputError("--eps needs at least one radius")
    return values


def fine_tune(
    model: str = typer.Argument(..., help="Model file: .onnx, .safetensors (+ spec) or TorchScript .pt/.ts."),
    target_l: float = typer.Option(..., "--target-L", help="Certified Lipschitz bound the fine-tuned model must meet."),
    data: Optional[str] = typer.Option(None, "--data", help="Training data (.npz/.pt/.safetensors/.csv/image folder)."),
    val: Optional[str] = typer.Option(None, "--val", help="Validation data for accuracy before/after (default: the training data)."),
    out_path: Optional[str] = typer.Option(None, "--out", "-o", help="Output file (same format as the input); default <stem>_L<target>.<ext>."),
    method: str = typer.Option("rslmi", "--method", "-m", help="rslmi (default), lip-loop (ADMM on the certificate: "
                               "LipSDP on dense chains, layerwise scalings otherwise) or project (baseline)."),
    epochs: int = typer.Option(10, "--epochs", help="Training epochs."),
    batch_size: int = typer.Option(128, "--batch-size", help="Training batch size."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
    seed: int = typer.Option(0, "--seed", help="Seed of data order, sketches and certification (recorded in the certificate)."),
    distill: bool = typer.Option(False, "--distill", help="Train on unlabelled inputs with the original model as the teacher."),
    eps: str = typer.Option("0.1", "--eps", help="Radius (or comma-separated radii) at which certified accuracy "
                            "(global radii) is reported; the margin loss trains for the first."),
    loss: str = typer.Option("auto", "--loss", help="Task loss: margin (scale-free Lipschitz-margin cross-entropy; "
                             "rslmi and lip-loop under auto), ce (plain cross-entropy; project and plain under auto)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="margin loss: inverse temperature of the logits "
                                         "divided by L_target (larger favours clean accuracy, smaller the certified "
                                         "radius; default 1.6 / margin-eps, 16 at eps 0.1)."),
    margin_eps: Optional[float] = typer.Option(None, "--margin-eps", help="margin loss: radius it trains for "
                                               "(default: the first --eps)."),
    x_key: str = typer.Option("x", "--x-key", help="Name of the input array in --data/--val."),
    y_key: str = typer.Option("y", "--y-key", help="Name of the label array in --data/--val."),
    label_column: str = typer.Option("label", "--label-column", help="Label column of a CSV dataset."),
    transform: Optional[str] = typer.Option(None, "--transform", help="Data transform, as for certify --data."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use a random subset of N training samples."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Per-sample input shape where the file does not say."),
    spec: Optional[str] = typer.Option(None, "--spec", help="Architecture spec (JSON) for a .safetensors file."),
    activation: str = typer.Option("relu", "--activation", help="Activation assumed when a safetensors MLP is inferred without a spec."),
    sketch_dim: int = typer.Option(8, "--sketch-dim", help="rslmi: sketch size per layer."),
    sketch_every: int = typer.Option(4, "--sketch-every", help="rslmi: steps that share one sketch."),
    penalty_every: int = typer.Option(4, "--penalty-every", help="rslmi: evaluate the penalty every k steps "
                                      "(weighted by k)."),
    alpha: float = typer.Option(0.3, "--alpha", help="rslmi: weight of the sketched-LMI hinge penalty."),
    rho: float = typer.Option(0.3, "--rho", help="lip-loop: ADMM penalty parameter."),
    device: str = typer.Option("cpu", "--device", help="Training device: cpu, cuda or auto (under torchrun with cuda "
                               "each rank uses GPU LOCAL_RANK and NCCL). Certification runs on the CPU."),
    certify_method: str = typer.Option("auto", "--certify-method", help="Bound method used to certify the exported file."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Checkpoint path (default <out>.ckpt)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint of an interrupted run (same options)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Certificate path (default <out stem>.certificate.json)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars and no table."),
):
    """Fine-tune a model until a target Lipschitz bound is certified on the exported file."""
    from lipverify.finetune import FinetuneOptions, finetune
    from lipverify.finetune.distributed import is_worker_rank
    from lipverify.load.model import parse_shape

    quiet = quiet or is_worker_rank()  # under torchrun only rank 0 talks
    try:
        radii = _parse_eps(eps)
        opts = FinetuneOptions(
            target_L=target_l, data=data, val=val, method=method, epochs=epochs, batch_size=batch_size, lr=lr,
            seed=seed, distill=distill, eps=radii[0], more_eps=tuple(radii[1:]), loss=loss, beta=beta,
            margin_eps=margin_eps, x_key=x_key, y_key=y_key, label_column=label_column,
            transform=transform, limit=limit, input_shape=parse_shape(input_shape), spec=spec, activation=activation,
            sketch_dim=sketch_dim, sketch_every=sketch_every, penalty_every=penalty_every, alpha=alpha, rho=rho,
            device=device, certify_method=certify_method, checkpoint=checkpoint, resume=resume,
            certificate=json_path)
        with _Reporter(not quiet and err.is_terminal) as reporter:
            result = finetune(model, out_path, opts, report=reporter)
        if result is None:  # a torchrun worker rank: rank 0 exports, certifies and reports
            return
    except LipverifyError as exc:
        label = "soundness failure" if exc.exit_code == EXIT_SOUNDNESS else "interrupted" if exc.exit_code == 130 else "error"
        err.print(Text.assemble((f"{label}:", "bold red"), f" {exc}"), soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    if not quiet:
        render_finetune(result.certificate, out)
        out.print(f"certificate: {result.certificate_path}")
    if not result.target_met:
        gate = {"name": "target-L", "value": result.certificate["certified_bound"], "threshold": target_l,
                "passed": False}
        err.print(Text.assemble(("target not met:", "bold red"), f" certified L {gate_check(gate, with_name=False)}"),
                  soft_wrap=True)
        raise typer.Exit(EXIT_GATE)
