"""Tightness: certified bound per method, sampled lower bound, lower/upper and seconds.

Models: the fixtures (mlp, cnn_bn, resmlp), every GLipSDP MNIST CNN and MLP ONNX file in
``../shared/external/GLipSDP/Scalability/exported_mnist_models`` (skipped when absent), a 5-conv
CIFAR-size CNN and ResNet-18 at 224x224 (random He / randomized-BN weights, built by
``benchmarks/scalable.py`` and ``benchmarks/resnet18.py``), and an FC-R18-shaped residual MLP
(Linear(784,64)-ReLU, 8 x [x -> ReLU(x + fc2(ReLU(fc1 x)))], Linear(64,10); random weights: the
published FC-R18 file is not part of this checkout).

Each (model, method) runs in a fresh subprocess (load + extract + bound + independent verification);
the lower bound is ``lipverify.attack.lower_bound`` measured on the file (default effort, capped by
``--lower-budget`` seconds), once per model.

    python benchmarks/tightness.py                         # everything that is present
    python benchmarks/tightness.py --models cnn_bn cnn_C3_CH8 --methods layerwise lipsdp-graph
    python benchmarks/tightness.py --json out/tightness.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

METHODS = ["product", "layerwise", "lipsdp-neuron", "lipsdp-graph"]
GLIPSDP = ["cnn_C3_CH8", "cnn_C5_CH16", "mlp_L3_W16", "mlp_L5_W32", "mlp_L9_W64"]
MODELS = ["mlp", "cnn_bn", "resmlp"] + GLIPSDP + ["fcr18", "cnn5", "resnet18"]


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return torch.relu(x + self.fc2(torch.relu(self.fc1(x))))


def fcr18() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), *[_Block(64) for _ in range(8)],
                          nn.Linear(64, 10))
    for m in model.modules():  # small residual branches, as a trained FC-R18 has
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.out_features == m.in_features == 64:
                m.weight.data *= 0.3
    return model.eval()


def model_path(name: str, folder: Path, external: Path) -> Path | None:
    if name in ("mlp", "cnn_bn", "resmlp"):
        return REPO / "fixtures" / f"{name}.onnx"
    if name in GLIPSDP:
        p = external / "GLipSDP" / "Scalability" / "exported_mnist_models" / f"{name}.onnx"
        return p if p.exists() else None
    path = folder / f"{name}.onnx"
    if path.exists():
        return path
    if name == "fcr18":
        module, shape = fcr18(), (1, 28, 28)
    elif name == "cnn5":
        from scalable import make_model

        module, shape = make_model("cnn5")
    elif name == "resnet18":
        from resnet18 import make_resnet18

        module, shape = make_resnet18(0), (3, 224, 224)
    else:
        raise ValueError(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn((1,) + tuple(shape)),), str(path), input_names=["input"],
                          output_names=["out"], dynamic_axes={"input": {0: "b"}, "out": {0: "b"}},
                          opset_version=17, dynamo=False)
    return path


def worker(path: str, method: str, options: dict) -> dict:
    torch.set_num_threads(int(os.environ.get("LIPVERIFY_THREADS", "1")))
    from lipverify.bounds import METHODS as REG, BoundContext
    from lipverify.certify import build_graph
    from lipverify.load import load_model
    from lipverify.verifier import verify

    graph, _ = build_graph(load_model(path))
    reason = REG[method].not_applicable(graph)
    if reason:
        return {"method": method, "skipped": reason}
    t = time.perf_counter()
    result = REG[method].run(graph, BoundContext(options=options))
    bound_s = time.perf_counter() - t
    t = time.perf_counter()
    verify(graph, result)
    return {"method": method, "value": result.value, "bound_s": bound_s, "verify_s": time.perf_counter() - t,
            "notes": result.notes}


def lower_worker(path: str, budget: float) -> dict:
    torch.set_num_threads(int(os.environ.get("LIPVERIFY_THREADS", "1")))
    from lipverify.attack import lower_bound
    from lipverify.certify import build_graph
    from lipverify.load import load_model

    loaded = load_model(path)
    graph, _ = build_graph(loaded)
    t = time.perf_counter()
    lb = lower_bound(loaded, graph, seed=0, budget_s=budget)
    return {"lower": lb.value, "lower_s": time.perf_counter() - t}


def _sub(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve())] + args
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--external", type=Path, default=REPO.parent / "shared" / "external")
    p.add_argument("--folder", type=Path, default=None, help="where generated .onnx files go (default: temp)")
    p.add_argument("--options", default="{}", help="JSON method options, e.g. '{\"lipsdp_graph_unroll_max\": 0}'")
    p.add_argument("--lower-budget", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", nargs=2, metavar=("ONNX", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--lower-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    options = json.loads(args.options)
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], options)))
        return
    if args.lower_worker:
        print(json.dumps(lower_worker(args.lower_worker, args.lower_budget)))
        return
    folder = args.folder or Path(tempfile.mkdtemp(prefix="lipverify-tight-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        path = model_path(name, folder, args.external)
        if path is None:
            print(f"{name}: not available (external data absent), skipped", flush=True)
            continue
        low = _sub(["--lower-worker", str(path), "--lower-budget", str(args.lower_budget)], args.timeout)
        row = {"model": name, "lower": low.get("lower"), "methods": {}}
        for method in args.methods:
            r = _sub(["--worker", str(path), method, "--options", args.options], args.timeout)
            row["methods"][method] = r
            print(name, method, json.dumps(r), flush=True)
        rows.append(row)
    print()
    print("| model | " + " | ".join(args.methods) + " | lower | lower / best upper | seconds (per method) |")
    print("|" + "---|" * (len(args.methods) + 4))
    for row in rows:
        vals, secs = [], []
        for m in args.methods:
            r = row["methods"][m]
            if "value" in r:
                vals.append(f"{r['value']:.6g}")
                secs.append(f"{r['bound_s'] + r['verify_s']:.1f}")
            else:
                vals.append("–")
                secs.append("–")
        uppers = [r["value"] for r in row["methods"].values() if "value" in r]
        lower = row["lower"]
        ratio = f"{lower / min(uppers):.3f}" if uppers and lower is not None else "–"
        low_s = f"{lower:.4g}" if lower is not None else "–"
        print(f"| {row['model']} | " + " | ".join(vals) + f" | {low_s} | {ratio} | {' / '.join(secs)} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
