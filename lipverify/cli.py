"""Command-line interface. Parses arguments, calls the library, renders. No math here."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from lipverify.errors import LipverifyError, UserInputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Certified L2 Lipschitz bounds for trained neural networks (ONNX, safetensors, TorchScript).")
out = Console()
err = Console(stderr=True)

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_SOUNDNESS = 0, 1, 2, 3


@contextlib.contextmanager
def progress_tracker(enabled: bool):
    """A ``track(iterable, description, total)`` function drawing rich progress bars on stderr."""
    if not enabled:
        yield lambda it, desc, total=None: it
        return
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=err, transient=True)

    def track(iterable, description, total=None):
        return progress.track(iterable, total=total, description=description)

    with progress:
        yield track


def _parse_floats(text: str, option: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserInputError(f"{option} {text!r}: expected comma-separated numbers")
    if not values:
        raise UserInputError(f"{option} is empty")
    return values


def _parse_gate(text: str) -> tuple[float, float]:
    try:
        acc, eps = text.split("@")
        return float(acc), float(eps)
    except ValueError:
        raise UserInputError(f"--min-certified-acc {text!r}: expected ACC@EPS, e.g. 0.6@0.25")


def _fail(exc: LipverifyError) -> None:
    label = "soundness failure" if exc.exit_code == EXIT_SOUNDNESS else "error"
    err.print(f"[bold red]{label}:[/] {exc}", highlight=False)
    raise typer.Exit(exc.exit_code)


def _options(method, output, input_shape, spec, activation, factory, device, seed, max_l, lower_starts,
             budget_s=None, budget_mem=None, graph_output=None):
    from lipverify.certify import CertifyOptions
    from lipverify.load.model import parse_shape

    return CertifyOptions(method=method, output=output, input_shape=parse_shape(input_shape), spec=spec,
                          activation=activation, factory=factory, device=device, seed=seed, max_L=max_l,
                          lower_starts=lower_starts, budget_s=budget_s, budget_mem=budget_mem,
                          graph_output=graph_output)


@app.command()
def certify(
    model: str = typer.Argument(..., help="Model file: .onnx, .safetensors (+ spec), .pt/.ts TorchScript, or a state dict with --factory."),
    method: str = typer.Option("auto", "--method", "-m", help="Bound method: auto, all, or a method name (see `lipverify methods`)."),
    output: Optional[int] = typer.Option(None, "--output", help="Bound one logit only (index)."),
    graph_output: Optional[str] = typer.Option(None, "--graph-output", help="ONNX graph output to certify (by name) when the graph has several."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the certificate as JSON to this path."),
    max_l: Optional[float] = typer.Option(None, "--max-L", help="Gate: exit 1 when the certified bound exceeds this."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Per-sample input shape, e.g. 1,28,28, where the file does not say."),
    spec: Optional[str] = typer.Option(None, "--spec", help="Architecture spec (JSON) for a .safetensors file."),
    activation: str = typer.Option("relu", "--activation", help="Activation assumed when a safetensors MLP is inferred without a spec."),
    factory: Optional[str] = typer.Option(None, "--factory", help="package.module:function building the nn.Module for a state-dict file."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled lower bound and of randomized methods."),
    lower_starts: int = typer.Option(16, "--lower-starts", help="Random starts of the lower-bound search."),
    lower_budget_s: float = typer.Option(10.0, "--lower-budget-s", help="Time limit (s) of the lower-bound search."),
    budget_s: Optional[float] = typer.Option(None, "--budget-s", help="Time budget (s) used by --method auto."),
    budget_mem: Optional[str] = typer.Option(None, "--budget-mem", help="Memory budget, e.g. 4G: larger models are refused before allocation."),
    sketch_dim: int = typer.Option(32, "--sketch-dim", help="rslmi: dimension of the Gaussian sketch."),
    sketch_iters: int = typer.Option(2, "--sketch-iters", help="rslmi: block power iterations of the sketch."),
    layerwise_steps: int = typer.Option(300, "--layerwise-steps", help="layerwise: optimisation steps on the scalings."),
    layerwise_seconds: float = typer.Option(60.0, "--layerwise-seconds", help="layerwise: time cap of the optimisation."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset for certified radii: .npz, .pt, .safetensors, .csv or an image folder."),
    eps: str = typer.Option("0.1,0.25,0.5", "--eps", help="Comma-separated L2 radii for certified accuracy."),
    x_key: str = typer.Option("x", "--x-key", help="Name of the input array in --data."),
    y_key: str = typer.Option("y", "--y-key", help="Name of the label array in --data."),
    label_column: str = typer.Option("label", "--label-column", help="Label column of a CSV dataset."),
    transform: Optional[str] = typer.Option(None, "--transform", help="Image/array transform, e.g. resize=28,grayscale,to_tensor,normalize=0.1307/0.3081"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use N samples (a seeded random subset)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Batch size for --data."),
    per_sample: Optional[str] = typer.Option(None, "--per-sample", help="Write per-sample radii to this CSV."),
    report: list[str] = typer.Option([], "--report", help="Write an audit report (.html or .md); repeatable."),
    min_certified_acc: list[str] = typer.Option([], "--min-certified-acc", help="Gate ACC@EPS, e.g. 0.6@0.25; repeatable."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No tables, no progress bars (exit code and --json only)."),
):
    """Certify an upper bound on the global L2 Lipschitz constant, with per-layer factors and a sampled lower bound."""
    from lipverify.certify import certify as run_certify, gates_passed
    from lipverify.fileio import write_json
    from lipverify.report.table import render_certificate

    try:
        opts = _options(method, output, input_shape, spec, activation, factory, device, seed, max_l, lower_starts,
                        budget_s, graph_output=graph_output)
        from lipverify.budget import parse_bytes

        opts.budget_mem = parse_bytes(budget_mem)
        opts.lower_budget_s = lower_budget_s
        if sketch_dim < 1 or sketch_iters < 0 or layerwise_steps < 0 or not layerwise_seconds >= 0:
            raise UserInputError("--sketch-dim must be >= 1; --sketch-iters, --layerwise-steps, --layerwise-seconds >= 0")
        opts.method_options.update(sketch_dim=sketch_dim, sketch_iters=sketch_iters,
                                   layerwise_steps=layerwise_steps, layerwise_seconds=layerwise_seconds)
        opts.per_sample_csv, opts.reports = per_sample, list(report)
        opts.extra_outputs = [json_path] if json_path else []
        opts.min_certified_acc = [_parse_gate(g) for g in min_certified_acc]
        if data is not None:
            from lipverify.data import DataSpec
            from lipverify.robustness import DataOptions

            if limit is not None and limit <= 0:
                raise UserInputError("--limit must be positive")
            if batch_size <= 0:
                raise UserInputError("--batch-size must be positive")
            spec_ = DataSpec(path=data, x_key=x_key, y_key=y_key, label_column=label_column, transform=transform,
                             limit=limit, seed=seed, batch_size=batch_size)
            opts.data = DataOptions(spec=spec_, eps=_parse_floats(eps, "--eps"))
        with progress_tracker(not quiet and err.is_terminal) as track:
            cert = run_certify(model, opts, track=track)
        if json_path:
            write_json(json_path, cert)
    except LipverifyError as exc:
        _fail(exc)
    if not quiet:
        render_certificate(cert, out)
    if not gates_passed(cert):
        err.print("[bold red]gate failed[/]: " + "; ".join(
            f"{g['name']}: {g['value']:.6g} > {g['threshold']}" for g in cert["gates"] if not g["passed"]))
        raise typer.Exit(EXIT_GATE)


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Model file."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Per-sample input shape where the file does not say."),
    spec: Optional[str] = typer.Option(None, "--spec", help="Architecture spec for .safetensors."),
    activation: str = typer.Option("relu", "--activation"),
    factory: Optional[str] = typer.Option(None, "--factory"),
    graph_output: Optional[str] = typer.Option(None, "--graph-output", help="ONNX graph output to inspect (by name) when the graph has several."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the extracted graph as JSON."),
):
    """Show the extracted graph: layers, shapes, slopes, and which methods apply."""
    from lipverify.certify import inspect as run_inspect
    from lipverify.fileio import write_json
    from lipverify.report.table import render_inspect

    try:
        if json_path and Path(json_path).resolve() == Path(model).resolve():
            raise UserInputError(f"refusing to overwrite the model file {model} with --json")
        info = run_inspect(model, _options("auto", None, input_shape, spec, activation, factory, "cpu", 0, None, 0,
                                           graph_output=graph_output))
        if json_path:
            write_json(json_path, info)
    except LipverifyError as exc:
        _fail(exc)
    render_inspect(info, out)
    if not info.get("supported", True):
        raise typer.Exit(2)


@app.command()
def check(
    certificate: str = typer.Argument(..., help="Certificate JSON written by `lipverify certify --json`."),
    model: str = typer.Argument(..., help="The model file the certificate claims to be about."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape"),
    spec: Optional[str] = typer.Option(None, "--spec"),
    activation: str = typer.Option("relu", "--activation"),
    factory: Optional[str] = typer.Option(None, "--factory"),
    graph_output: Optional[str] = typer.Option(None, "--graph-output", help="ONNX graph output the certificate "
                                               "must be about (default: the one it names)."),
    data: Optional[str] = typer.Option(None, "--data", help="The data file the certificate's radii and certified "
                                       "accuracy were computed on: they are recomputed from it."),
    ignore_data: bool = typer.Option(False, "--ignore-data", help="Check the bound only; report results on data "
                                     "as not verified instead of failing."),
):
    """Re-verify a certificate against a model file (float64 linear algebra only, no solver).

    Exit 0 valid, 1 the certificate does not hold for this file (or claims results on data that were not
    verified), 2 bad input."""
    from lipverify.load.model import parse_shape
    from lipverify.verifier.certificate import CertificateInvalid, check_certificate

    try:
        report = check_certificate(certificate, model, parse_shape(input_shape), spec, activation, factory,
                                   data_path=data, ignore_data=ignore_data, graph_output=graph_output)
    except CertificateInvalid as exc:
        err.print(f"[bold red]INVALID:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_GATE)
    except LipverifyError as exc:
        _fail(exc)
    for step, detail in report.steps:
        out.print(f"[green]✓[/] {step}: {detail}", highlight=False)
    for claim in report.unverified:
        out.print(f"[yellow]not verified[/] (--ignore-data): {claim}", highlight=False)
    if report.informational:
        out.print("[dim]not verified (they describe the run, not the model): "
                  + ", ".join(report.informational) + "[/]", highlight=False)
    out.print("[bold green]VALID[/]: the certificate holds for this model file"
              + (" (results on data not verified)" if report.unverified else ""))


@app.command()
def methods():
    """List the registered bound methods."""
    from lipverify.bounds import METHODS

    for name, m in METHODS.items():
        out.print(f"[bold]{name}[/]: {m.description}")


def _register_fine_tune() -> None:
    from lipverify.cli_finetune import fine_tune

    app.command("fine-tune")(fine_tune)


_register_fine_tune()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted (no output file was written)")
        sys.exit(130)
    except Exception as exc:  # a bug in lipverify, not a user mistake: say so, keep the traceback on demand
        if os.environ.get("LIPVERIFY_DEBUG"):
            raise
        err.print(f"[bold red]internal error[/] ({type(exc).__name__}): {exc}\n"
                  "This is a bug in lipverify; nothing was certified. Re-run with LIPVERIFY_DEBUG=1 for the "
                  "traceback and please report it.", highlight=False)
        sys.exit(EXIT_SOUNDNESS)


if __name__ == "__main__":  # pragma: no cover
    main()
