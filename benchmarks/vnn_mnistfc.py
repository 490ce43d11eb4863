"""VNN-COMP 2021 mnist_fc nets (784-256x{2,4,6}-10, trained): `certify --method auto`, time per method.

    PYTHONPATH=. .venv/bin/python benchmarks/vnn_mnistfc.py DIR [--device cpu] [--json out.json]

DIR holds mnist-net_256x2.onnx, mnist-net_256x4.onnx, mnist-net_256x6.onnx from the public
repository stanleybak/vnncomp2021 (benchmarks/mnistfc; not committed here). Missing files are
skipped. Prints, per net, every method auto ran with its certified bound, seconds and (LipSDP)
convergence, the methods auto skipped and why, and the whole certify wall time.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

NETS = ["mnist-net_256x2.onnx", "mnist-net_256x4.onnx", "mnist-net_256x6.onnx"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", default="auto")
    ap.add_argument("--json")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from lipverify.certify import CertifyOptions, certify

    out = {}
    for name in NETS:
        path = a.folder / name
        if not path.exists():
            print(f"{name}: absent, skipped")
            continue
        cert = certify(path, CertifyOptions(method=a.method, device=a.device))
        out[name] = {"certified": cert["certified_bound"], "method": cert["method"], "timings": cert["timings"],
                     "methods": {m: {k: v for k, v in e.items() if k in ("value", "seconds", "solver")}
                                 for m, e in cert["methods"].items()},
                     "reason": cert["method_reason"], "lower_bound": cert["lower_bound"]}
        print(f"{name}: certified {cert['certified_bound']:.6g} by {cert['method']} "
              f"(lower bound {cert['lower_bound']:.4g}); certify wall time {cert['timings']['total_s']:.1f} s "
              f"(bounds {cert['timings']['bound_s']:.1f} s, lower-bound search {cert['timings']['lower_s']:.1f} s)")
        for m, e in sorted(cert["methods"].items(), key=lambda kv: kv[1]["value"]):
            s = e.get("solver") or {}
            extra = f", converged={s.get('converged')}, {s.get('stop', '')}" if s and "newton_steps" in s else ""
            print(f"    {m:14} {e['value']:12.6g}  {e['seconds']:7.2f} s{extra}")
        print(f"    {cert['method_reason']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
