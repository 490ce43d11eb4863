"""LipSDP-Neuron and the compositional tier, side by side with cvxpy + SCS and ECLipsE-Fast.

    PYTHONPATH=. .venv/bin/python benchmarks/lipsdp_speed.py [--widths 100,300,1000] [--depths 2,5,10]
        [--scs-eps 1e-3,1e-5] [--scs-timeout 600] [--scs-max-hidden 600] [--no-eclipse] [--json out.json]
        [--device cuda]

Random ReLU nets 784 - width x depth - 10 with N(0, 1/fan_in) weights (seed 0), whole 10-logit
output. Per net, in one process (ratios against our own runs, same machine state):

* ours: ``lipsdp(..., "neuron")`` (structured interior point, verified), its Newton steps and
  whether it converged (relative duality gap <= 1e-6);
* compositional: the closed-form tier (``certify_compositional``: closed form + repair + float64
  verification);
* ECLipsE-Fast from the ``eclipse-nn`` PyPI package (installed by this script with
  ``pip install --no-deps --target`` into a temporary folder; not a project dependency), same weights;
  its number is unverified and, for ReLU, comparable;
* cvxpy + SCS at each ``--scs-eps``, given the SAME exact reduction of the input block (QR of
  W_0^T, an exact congruence), in a subprocess capped at ``--scs-timeout`` s; its T is repaired and
  verified on the full weights like ours. Only nets with at most ``--scs-max-hidden`` hidden neurons
  run SCS (it needs minutes from ~500 neurons on): the table says so.

Single-threaded BLAS everywhere (``--threads`` to change): the benchmark machine is shared.
"""

from __future__ import annotations

import os
import sys

THREADS = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), "1")
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, THREADS)

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(THREADS))


def make_net(dims, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(dims[i + 1], dims[i])) / np.sqrt(dims[i]) for i in range(len(dims) - 1)]


def dims_of(width, depth):
    return [784] + [width] * depth + [10]


# ---------------------------------------------------------------------------------------------- SCS
def scs_worker(dims, seed, eps):
    from lipverify.bounds.lipsdp_blocks import reduce_input
    from lipverify.bounds.lipsdp_core import repair, verify_lipsdp
    from lipverify.bounds.lipsdp_cvxpy import lipsdp_cvxpy

    ws = make_net(dims, seed)
    reduced = [reduce_input(torch.as_tensor(ws[0])).numpy()] + ws[1:]  # the same exact reduction we use
    t0 = time.perf_counter()
    r = lipsdp_cvxpy(reduced, (0, 1), "neuron", eps=eps)
    rho = repair(ws, (0, 1), r.T)  # verified on the full weights, like ours
    ok = verify_lipsdp(ws, (0, 1), r.T, rho)[0]
    print(json.dumps({"value": float(np.sqrt(rho)) if ok else None, "raw_value": r.raw_value,
                      "raw_violation": r.raw_violation, "seconds": time.perf_counter() - t0,
                      "status": r.info.get("status")}))


def run_scs(dims, seed, eps, timeout):
    cmd = [sys.executable, __file__, "--scs-worker", json.dumps(dims), "--seed", str(seed), "--eps", str(eps),
           "--threads", THREADS]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": time.perf_counter() - t0}
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
        return {"status": "error", "why": tail[:120], "seconds": time.perf_counter() - t0}
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["status"] = "ok"
    return res


# ----------------------------------------------------------------------------------------- ECLipsE
def load_eclipse():
    """ECLipsE-Fast from PyPI into a temporary folder (no dependencies pulled: numpy/torch/cvxpy/scipy
    are already here). None when it cannot be installed (offline)."""
    target = tempfile.mkdtemp(prefix="eclipse-nn-")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, "eclipse-nn"]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        return None
    sys.path.insert(0, target)
    from eclipse_nn import LipConstEstimator

    def eclipse_fast(ws):
        est = LipConstEstimator(weights=[torch.as_tensor(w) for w in ws])
        t0 = time.perf_counter()
        value = float(est.estimate(method="ECLipsE_Fast"))
        return value, time.perf_counter() - t0

    return eclipse_fast


# -------------------------------------------------------------------------------------------- main
DEVICE = "cpu"


def ours(ws):
    from lipverify.bounds.lipsdp_core import lipsdp

    r = lipsdp(ws, (0, 1), "neuron", device=DEVICE)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return {"value": r.value, "seconds": r.seconds, "converged": r.converged, "gap": r.gap,
            "steps": r.info.get("newton_steps"), "stop": r.stop}


def compositional_tier(ws):
    from lipverify.bounds.compositional import certify_compositional
    from lipverify.verifier.lipsdp import DenseChain

    t0 = time.perf_counter()
    tw = [torch.as_tensor(w) for w in ws]
    trusted = DenseChain(tw, [(0.0, 1.0)] * (len(ws) - 1), [w.abs() for w in tw])
    value, *_ = certify_compositional(ws, [(0.0, 1.0)] * (len(ws) - 1), trusted, device=DEVICE)
    return {"value": value, "seconds": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="100,300,1000")
    ap.add_argument("--depths", default="2,5,10")
    ap.add_argument("--scs-eps", default="1e-3,1e-5")
    ap.add_argument("--scs-timeout", type=float, default=600.0)
    ap.add_argument("--scs-max-hidden", type=int, default=600)
    ap.add_argument("--no-eclipse", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where our solver and the compositional tier run")
    ap.add_argument("--json")
    ap.add_argument("--scs-worker")
    ap.add_argument("--eps", type=float, default=1e-3)
    a = ap.parse_args()
    if a.scs_worker:
        scs_worker(json.loads(a.scs_worker), a.seed, a.eps)
        return
    global DEVICE
    DEVICE = a.device
    eclipse = None if a.no_eclipse else load_eclipse()
    if eclipse is None and not a.no_eclipse:
        print("note: eclipse-nn could not be installed; its columns are empty")
    eps_list = [float(e) for e in a.scs_eps.split(",") if e]
    rows = []
    print(f"{'net':16} {'ours s':>8} {'ours L':>10} {'conv':>5} {'steps':>5} | {'comp s':>7} {'comp L':>10} | "
          f"{'eclF s':>7} {'eclF L':>10} | SCS (eps: s, verified L, raw L, ours faster by)")
    for depth in [int(d) for d in a.depths.split(",")]:
        for width in [int(w) for w in a.widths.split(",")]:
            dims = dims_of(width, depth)
            name = f"784-{width}x{depth}-10"
            ws = make_net(dims, a.seed)
            row = {"net": name, "ours": ours(ws), "compositional": compositional_tier(ws)}
            if eclipse is not None:
                value, seconds = eclipse(ws)
                row["eclipse_fast"] = {"value": value, "seconds": seconds}
            o, c, e = row["ours"], row["compositional"], row.get("eclipse_fast")
            line = (f"{name:16} {o['seconds']:8.2f} {o['value']:10.5f} {'yes' if o['converged'] else 'NO':>5} "
                    f"{o['steps']:>5} | {c['seconds']:7.3f} {c['value']:10.5f} | ")
            line += f"{e['seconds']:7.3f} {e['value']:10.5f} | " if e else f"{'-':>7} {'-':>10} | "
            row["scs"] = {}
            for eps in eps_list:
                if width * depth > a.scs_max_hidden:
                    line += f"eps {eps:g}: not run (> {a.scs_max_hidden} hidden neurons); "
                    continue
                s = run_scs(dims, a.seed, eps, a.scs_timeout)
                row["scs"][str(eps)] = s
                if s["status"] == "ok":
                    line += (f"eps {eps:g}: {s['seconds']:.1f} s, {s['value']:.5f}, raw {s['raw_value']:.5f}, "
                             f"x{s['seconds'] / o['seconds']:.0f}; ")
                else:
                    line += f"eps {eps:g}: {s['status']} after {s['seconds']:.0f} s (x>{s['seconds'] / o['seconds']:.0f}); "
            print(line, flush=True)
            rows.append(row)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
