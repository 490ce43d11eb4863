"""Differential soundness campaign over random networks (seeded, resumable).

Every honest network: build (lipverify.campaign.random_network), export to ONNX, certify with every
applicable method, attack the torch model in float64 with an independent strong attack, compare;
tiny ReLU networks are also compared with their exact Lipschitz constant. 40 % of the seeds are
adversarial instead (lipverify.adversarial): a hand-written hostile ONNX file that must be refused or
certified above every quotient measured on the file, or a mutated certificate that `check` must reject.

    python benchmarks/soundness_campaign.py --minutes 25                 # run, append, summarize
    python benchmarks/soundness_campaign.py --count 10000 --jobs 8       # on a bigger machine
    python benchmarks/soundness_campaign.py --summary                    # summarize the results file
    python benchmarks/soundness_campaign.py --replay 1234                # rerun one seed verbosely

One JSON line per network is appended to --results; seeds already there are skipped, so an
interrupted run continues where it stopped. Any violation (a certified bound below the attack's
or the exact value) writes a reproducer: the ONNX file and a JSON with the seed and the record
under --repro-dir. Exit status: 0 no violation, 1 at least one violation (or crash/timeout).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _worker_init() -> None:
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from lipverify.campaign import load_all_methods

    load_all_methods()


def _run_one(args: tuple) -> dict:
    seed, workdir, kw = args
    from lipverify.campaign import check_network

    return check_network(seed, workdir, **kw)


def read_records(path: Path) -> list[dict]:
    records = []
    if path.exists():
        with open(path) as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by a kill: that seed is simply redone
                        pass
    return records


def write_reproducer(rec: dict, repro_dir: Path) -> Path:
    repro_dir.mkdir(parents=True, exist_ok=True)
    target = repro_dir / f"seed_{rec['seed']}"
    target.mkdir(exist_ok=True)
    if rec.get("onnx") and Path(rec["onnx"]).exists():
        shutil.copy(rec["onnx"], target / "model.onnx")
        rec = dict(rec, onnx=str(target / "model.onnx"))
    rec = dict(rec, replay=f"python benchmarks/soundness_campaign.py --replay {rec['seed']}")
    (target / "record.json").write_text(json.dumps(rec, indent=1))
    return target


def print_summary(records: list[dict], wall: float | None = None) -> dict:
    from lipverify.campaign import summarize

    s = summarize(records)
    if wall is not None:
        s["wall_seconds_this_run"] = round(wall, 1)
    exact = [r["attack_vs_exact"] for r in records if "attack_vs_exact" in r]
    if exact:
        exact.sort()
        s["attack_over_exact_median"] = exact[len(exact) // 2]
        s["attack_over_exact_min"] = exact[0]
    print(json.dumps(s, indent=1))
    bad = [r for r in records if r.get("violations") or r.get("status") in ("crash", "timeout", "soundness_error")]
    for r in bad[:20]:
        print(f"seed {r['seed']} ({r['family']}, {r.get('status')}): "
              f"{r.get('violations') or r.get('message')} reproducer={r.get('reproducer') or r.get('onnx')}")
    issues = [r for r in records if r.get("order_issues")]
    for r in issues[:10]:
        print(f"ordering issue seed {r['seed']}: {r['order_issues']}")
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "soundness_campaign.jsonl"))
    p.add_argument("--repro-dir", default=str(REPO / "benchmarks" / "results" / "soundness_repro"))
    p.add_argument("--start", type=int, default=0, help="first seed")
    p.add_argument("--count", type=int, default=10_000, help="networks to reach (including earlier runs)")
    p.add_argument("--minutes", type=float, default=None, help="stop starting new networks after this")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (1 thread each)")
    p.add_argument("--family", choices=["tiny_relu", "mlp", "cnn", "adversarial"], default=None,
                   help="one family only (default: a seeded mix, 40 %% adversarial files)")
    p.add_argument("--lower-starts", type=int, default=2, help="lipverify's own sampled lower bound")
    p.add_argument("--lower-budget-s", type=float, default=0.2)
    p.add_argument("--attack-budget-s", type=float, default=3.0)
    p.add_argument("--timeout-s", type=float, default=180.0, help="per network")
    p.add_argument("--summary", action="store_true", help="only summarize the results file")
    p.add_argument("--replay", type=int, default=None, help="rerun one seed and print its record")
    a = p.parse_args(argv)

    results = Path(a.results)
    kw = dict(family=a.family, lower_starts=a.lower_starts, lower_budget_s=a.lower_budget_s,
              attack_budget_s=a.attack_budget_s, timeout_s=a.timeout_s)
    if a.summary:
        s = print_summary(read_records(results))
        return 1 if s["violations"] else 0
    _worker_init()
    if a.replay is not None:
        workdir = Path(a.repro_dir) / f"replay_{a.replay}"
        workdir.mkdir(parents=True, exist_ok=True)
        rec = _run_one((a.replay, str(workdir), dict(kw, keep_onnx=True)))
        print(json.dumps(rec, indent=1))
        return 1 if rec["violations"] else 0

    results.parent.mkdir(parents=True, exist_ok=True)
    records = read_records(results)
    done = {r["seed"] for r in records}
    todo_n = max(0, a.count - len(done))
    t0 = time.perf_counter()
    deadline = t0 + 60 * a.minutes if a.minutes else None
    workdir = tempfile.mkdtemp(prefix="lipverify_campaign_")

    def seeds():
        s, n = a.start, 0
        while n < todo_n:
            if deadline and time.perf_counter() > deadline:
                return
            if s not in done:
                n += 1
                yield (s, workdir, kw)
            s += 1

    new = 0
    with open(results, "a") as fh:
        if a.jobs > 1:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(a.jobs, initializer=_worker_init)
            stream = pool.imap_unordered(_run_one, seeds())
        else:
            pool, stream = None, map(_run_one, seeds())
        try:
            for rec in stream:
                if rec["violations"] or rec.get("status") in ("crash", "timeout", "soundness_error"):
                    target = write_reproducer(rec, Path(a.repro_dir))
                    rec["reproducer"] = str(target)
                    print(f"!! seed {rec['seed']}: {rec.get('violations') or rec.get('message')} -> {target}",
                          flush=True)
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                records.append(rec)
                new += 1
                if new % 50 == 0:
                    el = time.perf_counter() - t0
                    print(f"{len(records)} networks ({new} new, {new / el:.2f}/s), "
                          f"violations so far: {sum(bool(r.get('violations')) for r in records)}", flush=True)
        except KeyboardInterrupt:
            print("interrupted: results so far are kept; rerun to continue", flush=True)
        finally:
            if pool is not None:
                pool.terminate()
    shutil.rmtree(workdir, ignore_errors=True)
    wall = time.perf_counter() - t0
    print(f"this run: {new} networks in {wall:.0f} s ({new / max(wall, 1e-9):.2f}/s)")
    s = print_summary(records, wall)
    return 1 if s["violations"] or s["status"].get("crash") or s["status"].get("timeout") else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
