"""Scalable certified bounds: time, peak memory and tightness of ``product``, ``rslmi`` and ``layerwise``.

Models (random weights, exported to ONNX in a temp folder and loaded by lipverify's own loader):
  mlp10x1000   784 -> 10 hidden layers of 1000 (ReLU) -> 10
  cnn5         5 convs at 32x32 (3->64->128 s2->128->256 s2->256, ReLU), global mean, dense 256->10
  resnet18     ResNet-18 at 224x224 (benchmarks/resnet18.py), BatchNorm folded by the loader

Each (model, method) runs in a fresh subprocess so that its peak resident memory
(``resource.getrusage(...).ru_maxrss``) is its own; "end to end" is load + extract + self-check +
bound + independent verification. The sampled lower bound is computed once per model.

    python benchmarks/scalable.py                       # everything, CPU
    python benchmarks/scalable.py --models mlp10x1000 cnn5 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

METHODS = ["product", "rslmi", "layerwise"]
MODELS = ["mlp10x1000", "cnn5", "resnet18"]


def make_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "mlp10x1000":
        layers, width = [nn.Linear(784, 1000), nn.ReLU()], 1000
        for _ in range(9):
            layers += [nn.Linear(width, width), nn.ReLU()]
        return _kaiming(nn.Sequential(*layers, nn.Linear(width, 10))), (784,)
    if name == "cnn5":
        chans = [(3, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1)]
        layers = []
        for c_in, c_out, s in chans:
            layers += [nn.Conv2d(c_in, c_out, 3, s, 1), nn.ReLU()]
        return _kaiming(nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))), (3, 32, 32)
    if name == "resnet18":
        from resnet18 import make_resnet18

        return make_resnet18(0), (3, 224, 224)
    raise ValueError(name)


def _kaiming(model: nn.Module) -> nn.Module:
    """He initialization (gain about 1 per ReLU layer), so that the random networks neither blow
    up nor vanish with depth and the lower/upper ratio means something."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.normal_(m.bias, std=0.01)
    return model


def export(name: str, folder: Path) -> Path:
    path = folder / f"{name}.onnx"
    if path.exists():
        return path
    model, shape = make_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn((1,) + shape),), str(path), input_names=["input"],
                          output_names=["out"], dynamic_axes={"input": {0: "b"}, "out": {0: "b"}},
                          opset_version=17, dynamo=False)
    return path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def worker(path: str, method: str, device: str, options: dict) -> dict:
    """One (model, method) run in this process: load, bound, verify. Prints JSON."""
    torch.set_num_threads(int(os.environ.get("LIPVERIFY_THREADS", "1")))
    import lipverify.bounds.layerwise  # noqa: F401
    import lipverify.bounds.rslmi  # noqa: F401
    from lipverify.bounds import METHODS as REG, BoundContext
    from lipverify.certify import build_graph
    from lipverify.load import load_model
    from lipverify.verifier import verify

    t0 = time.perf_counter()
    graph, _ = build_graph(load_model(path))
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    t = time.perf_counter()
    result = REG[method].run(graph, BoundContext(device=device, options=options))
    if device == "cuda":
        torch.cuda.synchronize()
    bound_s = time.perf_counter() - t
    t = time.perf_counter()
    verify(graph, result)
    verify_s = time.perf_counter() - t
    return {"method": method, "value": result.value, "load_s": load_s, "bound_s": bound_s, "verify_s": verify_s,
            "total_s": time.perf_counter() - t0, "peak_rss_mb": _rss_mb(), "rss_after_load_mb": rss_loaded,
            "gpu_peak_mb": (torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None,
            "notes": result.notes}


def lower_worker(path: str, budget: float) -> dict:
    torch.set_num_threads(int(os.environ.get("LIPVERIFY_THREADS", "1")))
    from lipverify.attack import lower_bound
    from lipverify.certify import build_graph
    from lipverify.load import load_model

    loaded = load_model(path)
    graph, _ = build_graph(loaded)
    t = time.perf_counter()
    lb = lower_bound(loaded, graph, starts=8, seed=0, budget_s=budget)  # measured on the file
    return {"lower": lb.value, "lower_s": time.perf_counter() - t}


def _sub(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve())] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--folder", type=Path, default=None, help="where the .onnx files go (default: temp)")
    p.add_argument("--sketch-dim", type=int, default=32)
    p.add_argument("--layerwise-steps", type=int, default=300)
    p.add_argument("--lower-budget", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", nargs=2, metavar=("ONNX", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--lower-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    options = {"sketch_dim": args.sketch_dim, "layerwise_steps": args.layerwise_steps}
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.device, options)))
        return
    if args.lower_worker:
        print(json.dumps(lower_worker(args.lower_worker, args.lower_budget)))
        return

    folder = args.folder or Path(tempfile.mkdtemp(prefix="lipverify-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"device={args.device} threads={os.environ.get('LIPVERIFY_THREADS', '1')} sketch_dim={args.sketch_dim}",
          flush=True)
    for model in args.models:
        path = export(model, folder)
        results = {}
        for method in args.methods:
            extra = ["--device", args.device, "--sketch-dim", str(args.sketch_dim),
                     "--layerwise-steps", str(args.layerwise_steps)]
            results[method] = _sub(["--worker", str(path), method] + extra, args.timeout)
            print(model, method, json.dumps(results[method]), flush=True)
        low = _sub(["--lower-worker", str(path), "--lower-budget", str(args.lower_budget)], args.timeout)
        print(model, "lower", json.dumps(low), flush=True)
        prod = results.get("product", {}).get("value")
        for method, r in results.items():
            if "error" in r:
                rows.append({"model": model, "method": method, "error": r["error"]})
                continue
            rows.append({"model": model, "method": method, "bound": r["value"],
                         "ratio_to_product": r["value"] / prod if prod else None,
                         "lower_over_upper": low.get("lower", float("nan")) / r["value"],
                         "bound_s": r["bound_s"], "verify_s": r["verify_s"], "end_to_end_s": r["total_s"],
                         "peak_rss_mb": r["peak_rss_mb"], "method_rss_mb": r["peak_rss_mb"] - r["rss_after_load_mb"],
                         "gpu_peak_mb": r["gpu_peak_mb"]})
    print()
    head = f"| model | method | certified L | /product | lower/upper | bound s | verify s | end-to-end s | peak RSS MB (method) |"
    print(head)
    print("|" + "---|" * 9)
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['method']} | error: {r['error']} |")
            continue
        print(f"| {r['model']} | {r['method']} | {r['bound']:.6g} | {r['ratio_to_product']:.4f} | "
              f"{r['lower_over_upper']:.4f} | {r['bound_s']:.1f} | {r['verify_s']:.1f} | {r['end_to_end_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} (+{r['method_rss_mb']:.0f}) |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
