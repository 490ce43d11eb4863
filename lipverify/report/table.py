"""Rich tables for the terminal. They read only the certificate dict.

Numbers go through ``report.numbers``: upper bounds round up, lower bounds and accuracies down.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lipverify.report.labels import pairwise_text, radius_form
from lipverify.report.numbers import fmt_down, fmt_num, fmt_pct, fmt_threshold, fmt_up, gate_check


def _shape(dims) -> str:
    return "×".join(str(d) for d in dims) or "scalar"


def layer_table(cert: dict, method: str | None = None, wide: bool = True) -> Table:
    """Per-layer rows of ``method`` (default: the reported one); RS-LMI rows add the sketched τ̂.

    Rows with a ``cumulative`` value (product, layerwise) show the certified bound up to that
    node, so the factors and the merges (residual Add, Concat) visibly combine into the bound."""
    method = method or cert["method"]
    layers = cert.get("methods", {}).get(method, {}).get("layers") or cert["layers"]
    sketched = any("tau_hat" in l for l in layers)
    cumulative = any(l.get("cumulative") is not None for l in layers)
    table = Table(title=f"Per-layer factors ({method})", show_lines=False)
    columns = [("#", "right"), ("layer (source)", "left"), ("operation", "left"), ("in → out", "left")]
    if sketched:
        columns.append(("τ̂ sketch (estimate)", "right"))
    lowers = any(l.get("lower") for l in layers)  # layerwise has no per-layer lower estimates: no empty columns
    columns += [("factor", "right"), ("τ = factor²", "right")]
    if lowers:
        columns += [("lower est.", "right"), ("gap", "right")]
    if cumulative:
        columns.append(("bound so far", "right"))
    if wide:  # how each factor was obtained; also in the JSON
        columns.append(("how", "left"))
    for col, justify in columns:
        table.add_column(col, justify=justify, overflow="fold")
    for i, l in enumerate(layers):
        factor = l.get("factor")
        gap = factor / l["lower"] if factor is not None and l.get("lower") else None
        shapes = f"{_shape(l['in_shape'])} → {_shape(l['out_shape'])}"
        row = [str(i), l["name"], l["op"], shapes]
        if sketched:
            row.append(fmt_num(l.get("tau_hat"), None))
        if factor is None:  # a merge: it combines its inputs' bounds, it has no factor of its own
            row += ["merge", "–"] + (["–", "–"] if lowers else [])
        else:
            row += [fmt_up(factor), fmt_up(l.get("tau"))]
            if lowers:
                row += [fmt_down(l.get("lower")) if l.get("lower") else "–", fmt_up(gap, 4) if gap else "–"]
        if cumulative:
            row.append(fmt_up(l.get("cumulative")) if l.get("cumulative") is not None else "–")
        if wide:
            row.append(l.get("how", ""))
        table.add_row(*[Text(c) for c in row])
    if method == "lipsdp-graph":
        table.caption = ("lipsdp-graph: one row per stage (an LMI or a layerwise stretch), its factor between the "
                         "weighted norms at its ends")
    elif method.startswith("lipsdp"):
        table.caption = ("LipSDP bounds the whole chain at once; these are the per-layer norms (their product is "
                         "the product bound)")
    elif cumulative and method == "layerwise":
        table.caption = "layerwise: factors and bounds so far in the scaled norms (the identity at the output)"
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
    table.add_row("model", Text(f"{cert['model']['path']} ({cert['model']['format']}, "
                                f"input {tuple(cert['model']['input_shape'])})"))
    table.add_row("bounded map", target)
    if cert["model"].get("max_abs_input") is not None:  # certificates before the domain was recorded lack it
        table.add_row("input domain", f"every |x_i| ≤ {fmt_down(cert['model']['max_abs_input'])} "
                                      "(no float32 overflow inside)")
    for name, value in sorted(cert["bounds"].items(), key=lambda kv: kv[1]):
        mark = "  ← certified" if name == cert["method"] else ""
        status = solver_status(cert.get("methods", {}).get(name, {}).get("solver") or {})
        table.add_row(f"bound ({name})", Text.assemble(f"{fmt_up(value)}{mark}", (f"  {status}" if status else "", "dim")))
    table.add_row("certified bound", Text(fmt_up(cert["certified_bound"]), style="bold green"))
    table.add_row("sampled lower bound", fmt_down(cert["lower_bound"]))
    table.add_row("lower / upper", fmt_down(cert["ratio"], 3))
    table.add_row("method", Text(f"{cert['method']} ({cert.get('method_reason', '')})"))
    table.add_row("verified by", Text(cert["verification"][cert["method"]]))
    table.add_row("device", cert["device"])
    run = cert.get("run") or {}
    wall = f"{cert['timings']['total_s']:.2f} s"
    if run.get("budget_s") is not None:
        wall += f" (--budget-s {fmt_threshold(run['budget_s'])} s: {len(run.get('cut_by_budget') or [])} cut(s))"
    table.add_row("wall time", wall)
    for g in cert.get("gates", []):
        status = Text("PASS", style="green") if g["passed"] else Text("FAIL", style="red")
        table.add_row(f"gate {g['name']}", Text.assemble(status, f"  {gate_check(g, with_name=False)}"))
    return table


def data_table(data: dict) -> Table:
    n = data["n"]
    # wide enough for its title: a two-column table would wrap the title into a narrow block
    title = f"Certified robustness on {data.get('path', 'data')} (n = {n})"
    table = Table(title=title, min_width=len(title) + 4)
    table.add_column("ε (L2)", justify="right")
    table.add_column("certified accuracy", justify="right")
    table.add_column("certified samples", justify="right")
    for eps, acc in data["certified_accuracy"].items():
        table.add_row(eps, fmt_pct(acc, space=True), f"{int(round(acc * n))} / {n}")
    q = data.get("radius_quantiles", {})
    pgd = data.get("pgd_check", {})
    pairs = pairwise_text(data)
    table.caption = (f"radii: {radius_form(data)}{f' (bounds: {pairs})' if pairs else ''}; clean accuracy {fmt_pct(data['clean_accuracy'], space=True)}; "
                     f"median certified radius {fmt_down(q.get('median'), 4)} (q25 {fmt_down(q.get('q25'), 4)}, "
                     f"q75 {fmt_down(q.get('q75'), 4)}); {data.get('n_ties', 0)} ties, "
                     f"{data.get('n_misclassified', 0)} misclassified; PGD check: {pgd.get('attacked', 0)} attacked, "
                     f"{pgd.get('successes', 0)} broken")
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
        console.print(Text.assemble(("note:", "yellow"), f" {note}"))
    for cut in (cert.get("run") or {}).get("cut_by_budget") or []:
        console.print(Text.assemble(("cut by --budget-s:", "bold yellow"), f" {cut}"))


def summary_line(cert: dict) -> str:
    """The --quiet line, e.g. ``PASS L ≤ 78.13 (product) ≤ 100``: verdict, certified bound (rounded
    up), method, and each gate's comparison; certified accuracies name their radius form."""
    gates = cert.get("gates") or []
    verdict = "PASS" if all(g["passed"] for g in gates) else "FAIL"
    text = f"{verdict} L ≤ {fmt_up(cert['certified_bound'], 4)} ({cert['method']})"
    for g in gates:
        if g["name"] == "max-L":
            text += f" {'≤' if g['passed'] else '>'} {fmt_threshold(g['threshold'])}"
    data = cert.get("data")
    if data:
        accs = ", ".join(f"{fmt_pct(a)} at ε={e}" for e, a in data["certified_accuracy"].items())
        text += f"; certified accuracy ({data.get('form')} radii) {accs}"
        for g in gates:
            if g["name"] != "max-L":
                text += f"; {gate_check(g)}"
    cuts = (cert.get("run") or {}).get("cut_by_budget") or []
    if cuts:
        text += f"; {len(cuts)} cut(s) by a time budget (see the JSON run.cut_by_budget)"
    return text


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
        table.add_row(*[Text(c) for c in (str(i), n["name"], n["kind"], n["op"],
                                          f"{tuple(n['in_shape'])} → {tuple(n['out_shape'])}", ", ".join(n["inputs"]))])
    console.print(table)
    sc = info["self_check"]
    console.print(f"self-check: max |IR − model| = {fmt_up(sc['max_abs_diff'], 3)} "
                  f"(tolerance {fmt_num(sc['tolerance'], None, 3)}) on {sc['samples']} random inputs", highlight=False)
    console.print(f"structure: {'plain chain' if info['chain'] else 'DAG (residual/concat)'}; "
                  f"{info['n_parameters']} parameters")
    for name, status in info["methods"].items():
        console.print(Text(f"method {name}: {status}"))
    for note in info.get("notes", []):
        console.print(Text.assemble(("note:", "yellow"), f" {note}"))
