"""Rich tables for the terminal. They read only the certificate dict."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(x, digits=6) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _shape(dims) -> str:
    return "×".join(str(d) for d in dims) or "scalar"


def layer_table(cert: dict, method: str | None = None, wide: bool = True) -> Table:
    """Per-layer rows of ``method`` (default: the reported one); RS-LMI rows add the sketched τ̂."""
    method = method or cert["method"]
    layers = cert.get("methods", {}).get(method, {}).get("layers") or cert["layers"]
    sketched = any("tau_hat" in l for l in layers)
    table = Table(title=f"Per-layer factors ({method})", show_lines=False)
    columns = [("#", "right"), ("layer (source)", "left"), ("operation", "left"), ("in → out", "left")]
    if sketched:
        columns.append(("τ̂ sketch (estimate)", "right"))
    columns += [("factor", "right"), ("τ = factor²", "right"), ("lower est.", "right"), ("gap", "right")]
    if wide:  # how each factor was obtained; also in the JSON
        columns.append(("how", "left"))
    for col, justify in columns:
        table.add_column(col, justify=justify, overflow="fold")
    for i, l in enumerate(layers):
        gap = l["factor"] / l["lower"] if l.get("lower") else None
        shapes = f"{_shape(l['in_shape'])} → {_shape(l['out_shape'])}"
        row = [str(i), l["name"], l["op"], shapes]
        if sketched:
            row.append(_fmt(l.get("tau_hat")))
        row += [_fmt(l["factor"]), _fmt(l["tau"]), _fmt(l.get("lower")), _fmt(gap, 4) if gap else "–"]
        if wide:
            row.append(l.get("how", ""))
        table.add_row(*row)
    return table


def solver_status(solver: dict) -> str:
    """A few words beside a bound on how its method ended (iterative methods only)."""
    if not solver or solver.get("stop", "").startswith("closed form"):
        return ""
    if solver.get("converged"):
        gap = solver.get("duality_gap")
        return f"(converged, duality gap {gap:.1e})" if gap is not None else "(converged)"
    stop = solver.get("stop", "")
    if "budget" in stop:
        return f"([yellow]cut by the time budget[/]: {stop})"
    return f"([yellow]not converged[/]: {stop})"


def summary_table(cert: dict) -> Table:
    table = Table(title="Certified global L2 Lipschitz bound", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    target = "whole output" if cert.get("output") is None else f"output {cert['output']}"
    table.add_row("model", f"{cert['model']['path']} ({cert['model']['format']}, input {tuple(cert['model']['input_shape'])})")
    table.add_row("bounded map", target)
    for name, value in sorted(cert["bounds"].items(), key=lambda kv: kv[1]):
        mark = "  ← certified" if name == cert["method"] else ""
        status = solver_status(cert.get("methods", {}).get(name, {}).get("solver") or {})
        table.add_row(f"bound ({name})", f"{value:.6g}{mark}" + (f"  [dim]{status}[/]" if status else ""))
    table.add_row("certified bound", f"[bold green]{cert['certified_bound']:.6g}[/]")
    table.add_row("sampled lower bound", f"{cert['lower_bound']:.6g}")
    table.add_row("lower / upper", f"{cert['ratio']:.3f}")
    table.add_row("method", f"{cert['method']} ({cert.get('method_reason', '')})")
    table.add_row("verified by", cert["verification"][cert["method"]])
    table.add_row("device", cert["device"])
    table.add_row("wall time", f"{cert['timings']['total_s']:.2f} s")
    for g in cert.get("gates", []):
        status = "[green]PASS[/]" if g["passed"] else "[red]FAIL[/]"
        op = g.get("direction", "<=").replace("<=", "≤").replace(">=", "≥")
        table.add_row(f"gate {g['name']} {op} {g['threshold']}", f"{status} ({_fmt(g['value'])})")
    return table


def data_table(data: dict) -> Table:
    table = Table(title=f"Certified robustness on {data.get('path', 'data')} (n = {data['n']})")
    table.add_column("ε (L2)", justify="right")
    table.add_column("certified accuracy", justify="right")
    for eps, acc in data["certified_accuracy"].items():
        table.add_row(eps, f"{100 * acc:.2f} %")
    q = data.get("radius_quantiles", {})
    table.caption = (f"clean accuracy {100 * data['clean_accuracy']:.2f} %; median certified radius "
                     f"{q.get('median', 0):.4g} (q25 {q.get('q25', 0):.4g}, q75 {q.get('q75', 0):.4g}); "
                     f"{data.get('n_ties', 0)} ties, {data.get('n_misclassified', 0)} misclassified; "
                     f"form: {data.get('form')}; PGD check: {data.get('pgd_check', {}).get('attacked', 0)} attacked, "
                     f"{data.get('pgd_check', {}).get('successes', 0)} broken")
    return table


def render_certificate(cert: dict, console: Console) -> None:
    wide = console.width >= 120
    console.print(layer_table(cert, wide=wide))
    if "rslmi" in cert.get("bounds", {}) and cert["method"] != "rslmi":
        console.print(layer_table(cert, "rslmi", wide=wide))
    console.print(summary_table(cert))
    if cert.get("data"):
        console.print(data_table(cert["data"]))
    for note in cert.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


def render_unsupported(info: dict, console: Console) -> None:
    table = Table(title=f"ONNX graph of {info['model']['path']} ({info['model']['format']})")
    for col in ("#", "node", "op"):
        table.add_column(col, overflow="fold")
    bad = {p["node"] for p in info["problems"]}
    for i, n in enumerate(info["onnx_nodes"]):
        name = n["name"] or "-"
        mark = "[bold red]" if name in bad else ""
        table.add_row(str(i), f"{mark}{name}", f"{mark}{n['op']}")
    console.print(table)
    console.print(f"[bold red]{len(info['problems'])} unsupported operation(s):[/]")
    for p in info["problems"]:
        console.print(f"  [bold]{p['op']}[/] at node {p['node']!r}: {p['why']}", highlight=False, soft_wrap=True)


def render_inspect(info: dict, console: Console) -> None:
    if not info.get("supported", True):
        return render_unsupported(info, console)
    table = Table(title=f"Extracted graph of {info['model']['path']} ({info['model']['format']})")
    for col in ("#", "node (source)", "kind", "operation", "in → out", "inputs"):
        table.add_column(col, overflow="fold")
    for i, n in enumerate(info["nodes"]):
        table.add_row(str(i), n["name"], n["kind"], n["op"], f"{tuple(n['in_shape'])} → {tuple(n['out_shape'])}",
                      ", ".join(n["inputs"]))
    console.print(table)
    console.print(f"self-check: max |IR − model| = {info['self_check']['max_abs_diff']:.3g} "
                  f"(tolerance {info['self_check']['tolerance']:.3g}) on {info['self_check']['samples']} random inputs")
    console.print(f"structure: {'plain chain' if info['chain'] else 'DAG (residual/concat)'}; "
                  f"{info['n_parameters']} parameters")
    for name, status in info["methods"].items():
        console.print(f"method {name}: {status}")
    for note in info.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
