"""Lower bounds before and after they ran on the file, against 10x longer runs and the certified bound.

Per model: the old lower bound (``baseline_lower_bound.py``: the graph-based search with its 10 s
budget, run in this process), the new one at the default effort (measured on the file), a run with
``--lower-effort 10``, the certified upper bound of certify's default method, and seconds. Ratios:
new / old and new / 10x (the issue asks for >= 0.95 on dense nets).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lower_bounds.py [--vnncomp DIR] [--quick]

Models: the fixtures; the GLipSDP MNIST ONNX files (../shared/external, skipped when absent); a GELU
MLP exported from torch (seed 0; also attacked by a 400-step Adam on ||J(x) v||, the reference
attack of the issue); a 17-layer GLipSDP-family MLP (Flatten, 17 x [1.1 x spectrally normalised
Linear(., 64), LeakyReLU(0.01)], Linear(64, 10); random weights, seed 0); and, with --vnncomp DIR,
VNN-COMP 2021 files from that folder (mnist-net_256x2.onnx, ACASXU_run2a_1_1_batch_2000.onnx).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
EXTERNAL = Path(os.environ.get("LIPVERIFY_EXTERNAL", REPO.parent / "shared" / "external"))
GLIPSDP = EXTERNAL / "GLipSDP" / "Scalability" / "exported_mnist_models"


def export(module: nn.Module, shape, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn((2,) + tuple(shape)),), str(path), dynamo=False,
                          opset_version=17, input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    return path


def gelu_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))


def glipsdp_mlp(depth: int = 17, width: int = 64) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = 784
    for _ in range(depth):
        lin = nn.Linear(fan_in, width)
        with torch.no_grad():
            lin.weight.mul_(1.1 / torch.linalg.matrix_norm(lin.weight, 2))
        layers += [lin, nn.LeakyReLU(0.01)]
        fan_in = width
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def adam_jv(module: nn.Module, shape, steps: int = 400, starts: int = 64, lr: float = 0.1, seed: int = 0) -> float:
    """The issue's reference attack: Adam on ||J(x) v|| with v by power iteration (float64, on the module)."""
    from torch.func import jvp, vjp

    net = module.double().eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((starts,) + tuple(shape), generator=gen, dtype=torch.float64).requires_grad_(True)
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    opt = torch.optim.Adam([x], lr=lr)
    best = 0.0
    for _ in range(steps):
        with torch.no_grad():
            _, pull = vjp(net, x.detach())
            _, jv = jvp(net, (x.detach(),), (v,))
            (v,) = pull(jv)
            v = v / v.flatten(1).norm(dim=1).reshape((-1,) + (1,) * len(shape))
        _, jv = jvp(net, (x,), (v,))
        gain = jv.flatten(1).norm(dim=1)
        best = max(best, float(gain.detach().max()))
        opt.zero_grad()
        (-gain.sum()).backward()
        opt.step()
    module.float()
    return best


def models(workdir: Path, vnncomp: Path | None, quick: bool, conv: bool) -> list[tuple[str, Path, str]]:
    out = [(f"fixture {n}", REPO / "fixtures" / f"{n}.onnx", "dense" if n != "cnn_bn" else "conv")
           for n in ("mlp", "resmlp", "cnn_bn")]
    out.append(("GELU MLP 64-64-64-10 (torch)", export(gelu_mlp(), (1, 8, 8), workdir / "gelu.onnx"), "dense"))
    if GLIPSDP.is_dir():
        for name in ("mlp_L3_W16", "mlp_L5_W32", "mlp_L9_W64") + (("cnn_C3_CH8",) if conv else ()):
            out.append((f"GLipSDP {name}", GLIPSDP / f"{name}.onnx", "conv" if name.startswith("cnn") else "dense"))
    out.append(("GLipSDP-family MLP, 17 layers", export(glipsdp_mlp(), (1, 28, 28), workdir / "mlp17.onnx"), "dense"))
    if vnncomp is not None:
        names = ["mnist-net_256x2", "ACASXU_run2a_1_1_batch_2000"]
        out += [(f"VNN-COMP {n}", vnncomp / f"{n}.onnx", "dense") for n in names if (vnncomp / f"{n}.onnx").is_file()]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vnncomp", type=Path, default=None, help="folder with VNN-COMP 2021 ONNX files")
    p.add_argument("--quick", action="store_true", help="no 10x runs")
    p.add_argument("--conv", action="store_true", help="also the GLipSDP CNN cnn_C3_CH8 (slow on a CPU: float64 convolutions)")
    p.add_argument("--method", default="auto", help="certify method for the upper bound column")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--only", nargs="*", default=None, help="run only the models whose label contains one of these")
    args = p.parse_args()
    torch.set_num_threads(1)

    from baseline_lower_bound import lower_bound as old_lower_bound

    from lipverify.attack import lower_bound
    from lipverify.certify import CertifyOptions, build_graph, certify
    from lipverify.load import load_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, path, kind in models(Path(tmp), args.vnncomp, args.quick, args.conv):
            if args.only is not None and not any(k in label for k in args.only):
                continue
            loaded = load_model(path)
            graph, _ = build_graph(loaded)
            t = time.perf_counter()
            old = old_lower_bound(graph.forward, graph.input_shape, seed=0).value
            old_s = time.perf_counter() - t
            t = time.perf_counter()
            new = lower_bound(loaded, graph, seed=0)
            new_s = time.perf_counter() - t
            long_value, long_s = None, None
            if not args.quick:
                t = time.perf_counter()
                long_value = lower_bound(loaded, graph, seed=0, effort=10).value
                long_s = time.perf_counter() - t
            cert = certify(path, CertifyOptions(method=args.method, lower_starts=1, lower_effort=0.01))
            row = {"model": label, "kind": kind, "old": old, "old_s": old_s, "new": new.value, "new_s": new_s,
                   "new_found_by": new.found_by, "evaluations": new.evaluations, "long": long_value,
                   "long_s": long_s, "certified": cert["certified_bound"], "method": cert["method"],
                   "certify_s": cert["timings"]["bound_s"]}
            if label.startswith("GELU"):
                row["adam_jv_400"] = adam_jv(gelu_mlp(), (1, 8, 8))
            rows.append(row)
            print(json.dumps(row), flush=True)

    print()
    print(f"{'model':34} {'old':>9} {'new':>9} {'10x':>9} {'certified':>10} {'new/old':>7} {'new/10x':>7} "
          f"{'new s':>6} {'10x s':>6}")
    for r in rows:
        long = f"{r['long']:9.4g}" if r["long"] is not None else f"{'-':>9}"
        ratio_long = f"{r['new'] / r['long']:7.3f}" if r["long"] else f"{'-':>7}"
        long_s = f"{r['long_s']:6.1f}" if r["long_s"] is not None else f"{'-':>6}"
        print(f"{r['model'][:34]:34} {r['old']:9.4g} {r['new']:9.4g} {long} {r['certified']:10.4g} "
              f"{r['new'] / r['old'] if r['old'] > 0 else float('inf'):7.2f} {ratio_long} {r['new_s']:6.1f} {long_s}")
    for r in rows:
        if "adam_jv_400" in r:
            print(f"{r['model']}: reference attack (400-step Adam on ||J(x) v||, 64 starts) {r['adam_jv_400']:.4g}")
    print("old: graph-based search, 10 s budget; new/10x: measured on the file (default effort / --lower-effort 10);"
          " certified: certify's default method; seconds on this machine (one thread)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
