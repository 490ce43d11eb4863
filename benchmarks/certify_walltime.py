"""Wall time of the default ``lipverify certify``, before and after, on the same machine in one run.

"Before" is the code at ``--base`` (default: the commit the issue-14 work started from), checked out
into a temporary ``git worktree``; "after" is this checkout. Both run as CLI subprocesses with the
same interpreter, environment and arguments, interleaved (before, after, before, after ...) so that
a busy machine slows both alike. Printed: seconds, the ratio before/after, and the certified
numbers of both runs (they must agree up to solver tolerance; the lower bound is sampled).

    python benchmarks/certify_walltime.py                 # fixtures + 784-512-512-10 MLP
    python benchmarks/certify_walltime.py --quick         # fixtures only
    python benchmarks/certify_walltime.py --base HEAD~3 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lipverify.report.numbers import fmt_pct, fmt_up  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
DEFAULT_BASE = "265a051"  # the branch point of the issue-14 work (before: per-method budgets, time-based cuts)
DATA = ["--data", str(FIX / "digits_test.npz"), "--eps", "0.05,0.1,0.2"]


def make_mlp784(path: Path) -> Path:
    """A 784-512-512-10 ReLU MLP with seeded He-uniform (torch default) weights, as ONNX."""
    import torch
    import torch.nn as nn

    import warnings

    torch.manual_seed(0)
    warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
    m = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    torch.onnx.export(m, (torch.randn(2, 784),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    return path


def run_cli(code_root: Path, args: list[str], json_path: Path) -> tuple[float, dict | None, str]:
    """(seconds, certificate or None, error tail) of ``lipverify certify ARGS`` with ``code_root``'s code."""
    boot = ("import sys; sys.path.insert(0, sys.argv.pop(1)); import lipverify; "
            "assert lipverify.__file__.startswith(sys.path[0]), lipverify.__file__; "
            "from lipverify.cli import main; sys.argv[0] = 'lipverify'; main()")
    cmd = [sys.executable, "-c", boot, str(code_root), "certify", *args, "--json", str(json_path), "-q"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    seconds = time.perf_counter() - t
    if proc.returncode not in (0, 1) or not json_path.exists():
        return seconds, None, (proc.stderr or proc.stdout)[-400:]
    cert = json.loads(json_path.read_text())
    json_path.unlink()
    return seconds, cert, ""


def summary(cert: dict | None) -> str:
    if cert is None:
        return "failed"
    text = f"{cert['method']} {fmt_up(cert['certified_bound'])}"
    if cert.get("data"):  # certified accuracies in %, rounded down
        text += " acc " + "/".join(fmt_pct(a, decimals=1)[:-1] for a in cert["data"]["certified_accuracy"].values())
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=DEFAULT_BASE, help="git ref of the 'before' code")
    p.add_argument("--quick", action="store_true", help="fixtures only (skip the 784-512-512-10 MLP)")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration (the median is shown)")
    p.add_argument("--only", default=None, help="run only the cases whose name contains this text")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="lipverify-walltime-") as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(base), args.base],
                       check=True)
        try:
            cases = [(f"{m} (default)", [str(FIX / f"{m}.onnx")], True) for m in ("mlp", "resmlp", "cnn_bn")]
            cases += [(f"{m} --data", [str(FIX / f"{m}.onnx"), *DATA], True) for m in ("mlp", "resmlp", "cnn_bn")]
            cases += [(f"{m} --data --fast", [str(FIX / f"{m}.onnx"), *DATA, "--fast"], False)
                      for m in ("mlp", "resmlp", "cnn_bn")]
            if not args.quick:
                mlp784 = make_mlp784(tmp / "mlp784.onnx")
                cases.append(("784-512-512-10 (default)", [str(mlp784)], True))
                cases.append(("784-512-512-10 --fast", [str(mlp784), "--fast"], False))
            if args.only:
                cases = [c for c in cases if args.only in c[0]]
            print(f"before = {args.base} (git worktree), after = this checkout; {os.cpu_count()} CPUs; "
                  f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
            print(f"{'case':30s} {'before s':>9s} {'after s':>9s} {'before/after':>12s}  before | after")
            for name, cli_args, with_base in cases:
                before, after = [], []
                cb = ca = None
                err = ""
                for _ in range(args.repeat):
                    if with_base:
                        s, cb, e = run_cli(base, cli_args, tmp / "b.json")
                        before.append(s)
                        err = err or e
                    s, ca, e = run_cli(ROOT, cli_args, tmp / "a.json")
                    after.append(s)
                    err = err or e
                b = sorted(before)[len(before) // 2] if before else None
                a = sorted(after)[len(after) // 2]
                ratio = f"{b / a:.2f}x" if b else "–"
                b_text = f"{b:9.1f}" if b else f"{'–':>9s}"
                print(f"{name:30s} {b_text} {a:9.1f} {ratio:>12s}  {summary(cb) if with_base else '–'} | "
                      f"{summary(ca)}", flush=True)
                if err:
                    print(f"    error: {err.strip()}")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)


if __name__ == "__main__":
    main()
