"""Accuracy vs certified Lipschitz bound after `lipverify fine-tune`, on the digits fixtures.

For each model (MLP, CNN with BatchNorm) and target L in (1, 2, 4, 8, the original certified L):
the certified L of the *exported* ONNX file (re-certified from disk with --certify-method auto),
validation accuracy and certified accuracy at eps, for rslmi, lip-loop (MLP only: it needs a dense
chain) and project. Also the per-epoch training-time ratio of rslmi over plain training.

Note: rescaling the output layer changes neither the predicted class nor the certified radii
(margin and L scale together), so any model meets any target "for free" in plain accuracy
(the `plain` row: no constraint, final correction only). Certified accuracy at eps is the
number that shows what the constraint buys.

    PYTHONPATH=. .venv/bin/python benchmarks/finetune_tradeoff.py [--epochs 10] [--eps 0.1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lipverify.finetune import FinetuneOptions, finetune

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"


def run(model, out, method, target, args):
    opts = FinetuneOptions(target_L=target, data=str(FIX / "digits_train.npz"), val=str(FIX / "digits_test.npz"),
                           method=method, epochs=args.epochs, batch_size=32, lr=1e-3, seed=0, eps=args.eps,
                           certify_method="auto", lower_starts=2, lower_budget_s=0.5)
    t = time.perf_counter()
    r = finetune(FIX / model, out, opts)
    ft = r.certificate["fine_tune"]
    return {"model": model, "method": method, "target": target, "L": r.certificate["certified_bound"],
            "certifier": r.certificate["method"], "L_trained": ft["certified_bound_trained"],
            "acc": ft["accuracy_after"], "acc0": ft["accuracy_before"], "cacc": ft["certified_accuracy_after"],
            "cacc0": ft["certified_accuracy_before"], "L0": ft["source"]["certified_bound"],
            "train_s": ft["train_seconds"], "epochs": args.epochs, "wall_s": time.perf_counter() - t}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--targets", default="1,2,4,8")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for model, methods in (("mlp.onnx", ["rslmi", "lip-loop", "project"]), ("cnn_bn.onnx", ["rslmi", "project"])):
            first = run(model, Path(d) / "probe.onnx", "plain", 1e9, args)  # original L, and plain timing
            L0 = first["L0"]
            targets = [float(t) for t in args.targets.split(",")] + [L0]
            for target in targets:
                for method in methods + (["plain"] if target == 4.0 else []):
                    row = run(model, Path(d) / f"{method}.onnx", method, target, args)
                    rows.append(row)
                    print(f"{model:12s} {method:9s} target {target:8.3f}  certified {row['L']:8.4f} ({row['certifier']})"
                          f"  acc {row['acc']:.4f}  cert.acc@{args.eps:g} {row['cacc']:.4f}  train {row['train_s']:.1f}s"
                          f"  wall {row['wall_s']:.1f}s", flush=True)
    print()
    print(f"| model | target L | method | certified L (exported file) | val. accuracy | certified acc. @ eps={args.eps:g} |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model'].split('.')[0]} | {r['target']:.4g} | {r['method']} | {r['L']:.4f} | {r['acc']:.4f} | {r['cacc']:.4f} |")
    print()
    for model in ("mlp.onnx", "cnn_bn.onnx"):
        r0 = next(r for r in rows if r["model"] == model)
        print(f"{model}: original accuracy {r0['acc0']:.4f}, certified L {r0['L0']:.4f}, certified acc. {r0['cacc0']:.4f}")
        by = {(r["method"], r["target"]): r for r in rows if r["model"] == model}
        for t in sorted({r["target"] for r in rows if r["model"] == model}):
            best = max((by[(m, t)] for m in ("rslmi", "lip-loop") if (m, t) in by), key=lambda r: r["acc"])
            proj = by[("project", t)]
            print(f"  target {t:.4g}: best of rslmi/lip-loop {best['method']} acc {best['acc']:.4f} vs project "
                  f"{proj['acc']:.4f} ({100 * (best['acc'] - proj['acc']):+.2f} pts); certified acc "
                  f"{best['cacc']:.4f} vs {proj['cacc']:.4f}")
        if ("plain", 4.0) in by and ("rslmi", 4.0) in by:
            ratio = by[("rslmi", 4.0)]["train_s"] / by[("plain", 4.0)]["train_s"]
            print(f"  training time per epoch, rslmi / plain: {ratio:.2f}x "
                  f"({by[('rslmi', 4.0)]['train_s'] / args.epochs:.3f} s vs {by[('plain', 4.0)]['train_s'] / args.epochs:.3f} s)")


if __name__ == "__main__":
    main()
