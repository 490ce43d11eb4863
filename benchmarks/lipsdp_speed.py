"""LipSDP-Neuron speed: the fast barrier solver vs cvxpy + SCS (eps 1e-3), both VERIFIED.

    PYTHONPATH=. .venv/bin/python benchmarks/lipsdp_speed.py [--quick] [--cvxpy-timeout 300] [--largest]

Random ReLU nets with N(0, 1/fan_in) weights, full 10-logit output. For each net it prints the wall
time of both paths, their ratio, both verified bounds (value = sqrt of a rho accepted by
verify_lipsdp, after repair of the solver's multipliers) and the raw SCS answer with its LMI
violation lambda_max(M) (> 0: SCS's own number is not a certificate). cvxpy runs in a subprocess
with a time limit ("timeout" when exceeded). ``--largest`` times bigger nets with the fast path
only (60 s budget each; the bound is verified even if the solver is stopped early).
Single-threaded BLAS everywhere (the benchmark machine is shared).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

NETS = {
    "784-100-10": [784, 100, 10],
    "784-200-200-10": [784, 200, 200, 10],
    "784-5x100-10": [784] + [100] * 5 + [10],
    "784-5x300-10": [784] + [300] * 5 + [10],
}
QUICK = ["784-100-10", "784-200-200-10"]
LARGE = {
    "784-500-500-10": [784, 500, 500, 10],
    "784-1000-1000-10": [784, 1000, 1000, 10],
}


def make_net(dims, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(dims[i + 1], dims[i])) / np.sqrt(dims[i]) for i in range(len(dims) - 1)]


def cvxpy_worker(dims, seed, eps):
    from lipverify.bounds.lipsdp_cvxpy import lipsdp_cvxpy
    r = lipsdp_cvxpy(make_net(dims, seed), (0, 1), "neuron", eps=eps)
    print(json.dumps({"value": r.value, "raw_value": r.raw_value, "raw_violation": r.raw_violation,
                      "seconds": r.seconds, "check": r.check}))


def run_cvxpy(dims, seed, eps, timeout):
    cmd = [sys.executable, __file__, "--cvxpy-worker", json.dumps(dims), "--seed", str(seed), "--eps", str(eps)]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": time.perf_counter() - t0}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or [f"exit code {out.returncode} (killed? out of memory?)"])[-1]
        return {"status": "error", "why": tail[:120], "seconds": time.perf_counter() - t0}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["status"] = "ok"
    res["wall"] = time.perf_counter() - t0  # includes python start-up and cvxpy canonicalisation
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--largest", action="store_true")
    ap.add_argument("--no-cvxpy", action="store_true")
    ap.add_argument("--cvxpy-timeout", type=float, default=300.0)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nets", help="comma-separated subset of " + ",".join(NETS))
    ap.add_argument("--cvxpy-worker")
    a = ap.parse_args()
    if a.cvxpy_worker:
        cvxpy_worker(json.loads(a.cvxpy_worker), a.seed, a.eps)
        return
    from lipverify.bounds.lipsdp_core import lipsdp

    names = a.nets.split(",") if a.nets else QUICK if a.quick else list(NETS)
    print(f"{'net':18} {'fast s':>8} {'fast L (verified)':>18} {'scs s':>8} {'scs L (verified)':>17} "
          f"{'scs raw L':>10} {'raw lmax(M)':>12} {'speed-up':>9}")
    for name in names:
        ws = make_net(NETS[name], a.seed)
        r = lipsdp(ws, (0, 1), "neuron")
        line = f"{name:18} {r.seconds:8.2f} {r.value:18.6f}"
        if a.no_cvxpy:
            print(line, flush=True)
            continue
        c = run_cvxpy(NETS[name], a.seed, a.eps, a.cvxpy_timeout)
        if c["status"] == "ok":
            line += (f" {c['seconds']:8.1f} {c['value']:17.6f} {c['raw_value']:10.6f} {c['raw_violation']:12.2e}"
                     f" {c['seconds'] / r.seconds:8.1f}x")
        else:
            line += f" {c['status']:>8} (> {c['seconds']:.0f} s, speed-up > {c['seconds'] / r.seconds:.0f}x)"
            if "why" in c:
                line += f" {c['why']}"
        print(line, flush=True)
    if a.largest:
        print("\nfast path only, 60 s budget (value verified even when stopped early):")
        for name, dims in LARGE.items():
            ws = make_net(dims, a.seed)
            r = lipsdp(ws, (0, 1), "neuron", time_budget_s=60)
            print(f"{name:18} {r.seconds:8.2f} s  L = {r.value:.6f}  newton steps {r.info['newton_steps']}"
                  f"  outer {r.info['outer']}  product {np.prod([np.linalg.norm(w, 2) for w in ws]):.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
