"""Render an HTML report in headless Chromium and check the screenshot is not blank.

    python scripts/screenshot_report.py REPORT.html OUT.png
    python scripts/screenshot_report.py --example REPORT.html OUT.png   # build REPORT.html first

``--example`` writes a report from a realistic certificate: a small MLP trained on scikit-learn's
digits (8x8 images), its exact per-layer spectral norms (product bound), a gradient lower bound,
and certified radii on the held-out digits computed with lipverify.radii. (The bounds here are
computed in a few lines for the picture; the tool's real pipeline makes the real ones.)

Exit 0 when the PNG has more than one colour and over 1% non-white pixels; 1 when blank; 2 when
Chromium is missing or fails. Chromium runs with no network features and a throwaway profile.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(html: Path, png: Path, width: int = 1200, height: int = 2000, timeout: float = 120) -> None:
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="lipverify-chromium-") as profile:
        cmd = [
            exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png.resolve()}",
            f"--window-size={width},{height}", html.resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not png.exists():
        raise RuntimeError(f"chromium failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


def blank_check(png: Path) -> tuple[bool, int, float]:
    """(looks non-blank, number of distinct colours, non-white fraction)."""
    from PIL import Image

    with Image.open(png) as img:
        rgb = img.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 24)
        n_colors = len(colors) if colors is not None else 1 << 24
        gray = rgb.convert("L")
        hist = gray.histogram()
        total = sum(hist)
        nonwhite = 1.0 - sum(hist[250:]) / total
    return n_colors > 1 and nonwhite > 0.01, n_colors, nonwhite


def example_certificate() -> dict:
    """A realistic certificate dict from a digits MLP (see the module docstring)."""
    import hashlib
    import platform
    import time

    import numpy as np
    import torch
    from sklearn.datasets import load_digits

    from lipverify.radii import compute_radii, summarize

    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    tr, te = perm[:1400], perm[1400:]
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-3)
    xt, yt = torch.from_numpy(x[tr]), torch.from_numpy(y[tr])
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    t_train = time.perf_counter() - t0

    t1 = time.perf_counter()
    weights = [m.weight.detach().double().numpy() for m in model if isinstance(m, torch.nn.Linear)]
    layers, product = [], 1.0
    names = ["fc1", "relu1", "fc2", "relu2", "fc3"]
    shapes = [64, 64, 64, 32, 32, 10]
    wi = 0
    for i, m in enumerate(model):
        if isinstance(m, torch.nn.Linear):
            s = float(np.linalg.norm(weights[wi], 2)) * (1 + 1e-12)
            layers.append({"name": names[i], "op": "Dense", "in_shape": [shapes[i]], "out_shape": [shapes[i + 1]],
                           "factor": s, "tau": s, "lower": s * (1 - 1e-9), "how": "exact SVD (float64)"})
            product *= s
            wi += 1
        else:
            layers.append({"name": names[i], "op": "ReLU", "in_shape": [shapes[i]], "out_shape": [shapes[i + 1]],
                           "factor": 1.0, "tau": 1.0, "lower": 1.0, "how": "slope [0, 1]"})
    # lower bound: the largest Jacobian norm at the test points
    xe = torch.from_numpy(x[te]).double().requires_grad_(False)
    m64 = model.double()
    lower = 0.0
    for xi in xe[:100]:
        jac = torch.autograd.functional.jacobian(m64, xi)
        lower = max(lower, float(torch.linalg.matrix_norm(jac, 2)))
    # stand-ins for tighter SDP methods in the picture, placed between the true bounds
    sdp = lower + 0.30 * (product - lower)
    sdp_layer = lower + 0.55 * (product - lower)
    t_bound = time.perf_counter() - t1

    with torch.no_grad():
        logits = m64(xe).numpy()
    eps = [0.05, 0.1, 0.2, 0.3]
    r = compute_radii(logits, y[te], sdp, None, eps)
    data = summarize(r, eps)
    data = {"path": "digits_test.npz", **data}
    raw = b"".join(w.tobytes() for w in weights)
    return {
        "schema_version": "1.0",
        "model": {"path": "models/digits_mlp.onnx", "sha256": hashlib.sha256(raw).hexdigest(),
                  "format": "onnx", "input_shape": [64]},
        "method": "lipsdp-neuron",
        "output": None,
        "certified_bound": sdp,
        "lower_bound": lower,
        "ratio": lower / sdp,
        "bounds": {"product": product, "lipsdp-layer": sdp_layer, "lipsdp-neuron": sdp},
        "layers": layers,
        "verification": {
            "product": "exact float64 SVD per layer, inflated by 1000·n·eps64",
            "lipsdp-layer": "Cholesky of the block-tridiagonal LMI at rho·(1+1e-9): positive definite",
            "lipsdp-neuron": "Cholesky of the block-tridiagonal LMI at rho·(1+1e-9): positive definite",
        },
        "device": "cpu",
        "timings": {"load_s": 0.012, "train_example_s": t_train, "bounds_s": t_bound, "total_s": time.perf_counter() - t0},
        "versions": {"lipverify": "0.1.0", "python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__},
        "gates": [
            {"name": "max-L", "threshold": 10.0, "value": sdp, "passed": sdp <= 10.0},
            {"name": "min-certified-accuracy@0.1", "threshold": 0.5,
             "value": data["certified_accuracy"]["0.1"], "passed": data["certified_accuracy"]["0.1"] >= 0.5},
        ],
        "data": data,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--example", action="store_true", help="first write HTML from a realistic example certificate")
    ap.add_argument("--markdown", type=Path, help="with --example: also write the Markdown report here")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=2000)
    args = ap.parse_args(argv)
    if args.example:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from lipverify.report.html import write_html
        from lipverify.report.markdown import write_markdown

        cert = example_certificate()
        write_html(cert, args.html)
        if args.markdown:
            write_markdown(cert, args.markdown)
    if not args.html.exists():
        print(f"no such file: {args.html}", file=sys.stderr)
        return 2
    try:
        screenshot(args.html, args.png, args.width, args.height)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"screenshot failed: {exc}", file=sys.stderr)
        return 2
    ok, n_colors, nonwhite = blank_check(args.png)
    print(f"{args.png}: {n_colors} colours, non-white fraction {nonwhite:.3f} -> {'OK' if ok else 'BLANK'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
