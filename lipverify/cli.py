"""Command-line interface. Parses arguments, calls the library, renders. No math here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from lipverify.errors import LipverifyError, UserInputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Certified L2 Lipschitz bounds for trained neural networks (ONNX, safetensors, TorchScript).")
out = Console()
err = Console(stderr=True)

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_SOUNDNESS = 0, 1, 2, 3

# help shared by the commands that load a model
H_INPUT_SHAPE = "Per-sample input shape, e.g. 1,28,28, where the file does not say (TorchScript, symbolic ONNX dims)."
H_SPEC = "Architecture spec (JSON) for a .safetensors file (default: <stem>.json beside it, else an inferred MLP)."
H_ACTIVATION = "Activation assumed when a safetensors MLP is inferred without a spec."
H_FACTORY = "package.module:function building the nn.Module for a state-dict file."


def say_error(label: str, message: str) -> None:
    """An error line on stderr, never wrapped (CI logs and greps see the whole message) and never
    read as rich markup (messages quote user text such as ``[0, 1]``)."""
    err.print(Text.assemble((f"{label}:", "bold red"), " ", str(message)), soft_wrap=True)


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
    say_error("soundness failure" if exc.exit_code == EXIT_SOUNDNESS else "error", str(exc))
    raise typer.Exit(exc.exit_code)


def _options(method, output, input_shape, spec, activation, factory, device, seed, max_l, lower_starts,
             budget_s=None, budget_mem=None, graph_output=None):
    from lipverify.certify import CertifyOptions
    from lipverify.load.model import parse_shape

    return CertifyOptions(method=method, output=output, input_shape=parse_shape(input_shape), spec=spec,
                          activation=activation, factory=factory, device=device, seed=seed, max_L=max_l,
                          lower_starts=lower_starts, budget_s=budget_s, budget_mem=budget_mem,
                          graph_output=graph_output)


def _version(value: bool) -> None:
    if value:
        from lipverify.audit import git_commit
        import lipverify

        git = git_commit()
        suffix = f" (git {git['commit'][:12]}{', modified' if git['dirty'] else ''})" if git else ""
        out.print(f"lipverify {lipverify.__version__}{suffix}", highlight=False)
        raise typer.Exit(EXIT_OK)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the lipverify version (and git commit in a checkout) and exit.")):
    """Certified L2 Lipschitz bounds for trained neural networks (ONNX, safetensors, TorchScript)."""


@app.command()
def certify(
    model: str = typer.Argument(..., help="Model file: .onnx, .safetensors (+ spec), .pt/.ts TorchScript, or a state dict with --factory."),
    method: str = typer.Option("auto", "--method", "-m", help="Bound method: auto (every applicable method within auto's size rules; the tightest is reported), all, or a method name (see `lipverify methods`)."),
    fast: bool = typer.Option(False, "--fast", help="Quick mode for CI: the product bound only (global and pairwise), seconds even on large models; looser than auto."),
    output: Optional[int] = typer.Option(None, "--output", help="Bound one logit only (its index); default: the whole output."),
    graph_output: Optional[str] = typer.Option(None, "--graph-output", help="ONNX graph output to certify (by name) when the graph has several."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the certificate as JSON to this path."),
    max_l: Optional[float] = typer.Option(None, "--max-L", help="Gate: exit 1 when the certified bound exceeds this."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=H_INPUT_SHAPE),
    spec: Optional[str] = typer.Option(None, "--spec", help=H_SPEC),
    activation: str = typer.Option("relu", "--activation", help=H_ACTIVATION),
    factory: Optional[str] = typer.Option(None, "--factory", help=H_FACTORY),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled lower bound, of randomized methods and of --limit's subset."),
    lower_starts: Optional[int] = typer.Option(None, "--lower-starts", help="Gradient-ascent starts of the lower-bound search (default: by model size, 4 to 64)."),
    lower_effort: float = typer.Option(1.0, "--lower-effort", help="Multiplies the work of the lower-bound search (evaluation and start counts); the result depends on it, never on timing."),
    lower_budget_s: Optional[float] = typer.Option(None, "--lower-budget-s", help="Optional time cap (s) of the lower-bound search; when it cuts, the output says where."),
    budget_s: Optional[float] = typer.Option(None, "--budget-s", help="Total wall-clock budget (s) for the whole run; when it is spent the remaining work is cut and the output lists exactly what. Default: no time limit."),
    budget_mem: Optional[str] = typer.Option(None, "--budget-mem", help="Memory budget, e.g. 4G: larger models are refused before allocation."),
    sketch_dim: int = typer.Option(32, "--sketch-dim", help="rslmi: dimension of the Gaussian sketch."),
    sketch_iters: int = typer.Option(2, "--sketch-iters", help="rslmi: block power iterations of the sketch."),
    layerwise_steps: int = typer.Option(300, "--layerwise-steps", help="layerwise: Adam steps on the scalings (always run in full unless --budget-s is spent)."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset for certified radii: .npz, .pt, .safetensors, .csv or an image folder."),
    eps: str = typer.Option("0.1,0.25,0.5", "--eps", help="Comma-separated L2 radii for certified accuracy."),
    x_key: str = typer.Option("x", "--x-key", help="Name of the input array in --data."),
    y_key: str = typer.Option("y", "--y-key", help="Name of the label array in --data."),
    label_column: str = typer.Option("label", "--label-column", help="Label column of a CSV dataset."),
    transform: Optional[str] = typer.Option(None, "--transform", help="Image/array transform, e.g. resize=28,grayscale,to_tensor,normalize=0.1307/0.3081"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use N samples (a seeded random subset); default: all."),
    batch_size: int = typer.Option(256, "--batch-size", help="Batch size for --data."),
    per_sample: Optional[str] = typer.Option(None, "--per-sample", help="Write per-sample radii to this CSV."),
    report: list[str] = typer.Option([], "--report", help="Write an audit report (.html or .md); repeatable."),
    min_certified_acc: list[str] = typer.Option([], "--min-certified-acc", help="Gate ACC@EPS, e.g. 0.6@0.25: exit 1 when certified accuracy at EPS is below ACC; repeatable."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="One summary line (e.g. `PASS L ≤ 78.13 (product) ≤ 100`), no tables, no progress."),
):
    """Certify an upper bound on the global L2 Lipschitz constant, with per-layer factors and a sampled lower bound."""
    from lipverify.certify import certify as run_certify, gates_passed
    from lipverify.fileio import write_json
    from lipverify.report.numbers import gate_check
    from lipverify.report.progress import make_progress
    from lipverify.report.table import render_certificate, summary_line

    try:
        opts = _options(method, output, input_shape, spec, activation, factory, device, seed, max_l, lower_starts,
                        budget_s, graph_output=graph_output)
        from lipverify.audit import command_line
        from lipverify.budget import parse_bytes

        opts.budget_mem = parse_bytes(budget_mem)
        opts.lower_budget_s = lower_budget_s
        opts.fast = fast
        opts.command = command_line()
        opts.lower_effort = lower_effort
        if sketch_dim < 1 or sketch_iters < 0 or layerwise_steps < 0:
            raise UserInputError("--sketch-dim must be >= 1; --sketch-iters and --layerwise-steps >= 0")
        opts.method_options.update(sketch_dim=sketch_dim, sketch_iters=sketch_iters, layerwise_steps=layerwise_steps)
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
        with make_progress(err, quiet) as progress:
            cert = run_certify(model, opts, track=progress)
        if json_path:
            write_json(json_path, cert)
    except LipverifyError as exc:
        _fail(exc)
    if quiet:
        out.print(summary_line(cert), highlight=False, markup=False, soft_wrap=True)
    else:
        render_certificate(cert, out)
    if not gates_passed(cert):
        say_error("gate failed", "; ".join(gate_check(g) for g in cert["gates"] if not g["passed"]))
        raise typer.Exit(EXIT_GATE)


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Model file: .onnx, .safetensors (+ spec), .pt/.ts TorchScript, or a state dict with --factory."),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=H_INPUT_SHAPE),
    spec: Optional[str] = typer.Option(None, "--spec", help=H_SPEC),
    activation: str = typer.Option("relu", "--activation", help=H_ACTIVATION),
    factory: Optional[str] = typer.Option(None, "--factory", help=H_FACTORY),
    graph_output: Optional[str] = typer.Option(None, "--graph-output", help="ONNX graph output to inspect (by name) when the graph has several."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the extracted graph as JSON to this path."),
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
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help=H_INPUT_SHAPE),
    spec: Optional[str] = typer.Option(None, "--spec", help=H_SPEC),
    activation: str = typer.Option("relu", "--activation", help=H_ACTIVATION),
    factory: Optional[str] = typer.Option(None, "--factory", help=H_FACTORY),
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
        say_error("INVALID", str(exc))
        raise typer.Exit(EXIT_GATE)
    except LipverifyError as exc:
        _fail(exc)
    for step, detail in report.steps:
        out.print(Text.assemble(("✓", "green"), f" {step}: {detail}"), soft_wrap=True)
    for claim in report.unverified:
        out.print(Text.assemble(("not verified", "yellow"), f" (--ignore-data): {claim}"), soft_wrap=True)
    if report.informational:
        out.print(Text("not verified (they describe the run, not the model): " + ", ".join(report.informational),
                       style="dim"), soft_wrap=True)
    out.print("[bold green]VALID[/]: the certificate holds for this model file"
              + (" (results on data not verified)" if report.unverified else ""))


@app.command("report")
def report_cmd(
    certificate: str = typer.Argument(..., help="Certificate JSON written by `lipverify certify --json`."),
    html: Optional[str] = typer.Option(None, "--html", help="Write a self-contained HTML report to this path."),
    md: Optional[str] = typer.Option(None, "--md", help="Write a Markdown report to this path."),
):
    """Render an HTML and/or Markdown report from a certificate alone (no model, no computation).

    The report shows what the certificate claims; `lipverify check` re-verifies it against the model."""
    from lipverify.certify import write_report
    from lipverify.fileio import check_writable, read_json_object

    try:
        if not html and not md:
            raise UserInputError("give --html PATH and/or --md PATH")
        targets = [(html, ".html"), (md, ".md")]
        for path, suffix in targets:
            if path:
                if Path(path).resolve() == Path(certificate).resolve():
                    raise UserInputError(f"refusing to overwrite the certificate {certificate}")
                check_writable(path)
        cert = read_json_object(certificate, "certificate (JSON)")
        for path, suffix in targets:
            if path:
                write_report(cert, path, kind=suffix[1:])
                out.print(f"wrote {path}", highlight=False)
    except LipverifyError as exc:
        _fail(exc)


@app.command()
def methods():
    """List the registered bound methods."""
    from lipverify.bounds import METHODS

    for name, m in METHODS.items():
        out.print(Text.assemble((name, "bold"), f": {m.description}"), soft_wrap=True)


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
        say_error("internal error", f"({type(exc).__name__}) {exc}\nThis is a bug in lipverify; nothing was "
                  "certified. Re-run with LIPVERIFY_DEBUG=1 for the traceback and please report it.")
        sys.exit(EXIT_SOUNDNESS)


if __name__ == "__main__":  # pragma: no cover
    main()
