"""lipverify fine-tune: exported files re-certify under the target, formats round-trip, the input is
never overwritten, resume reproduces an uninterrupted run, bad data exits 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lipverify.certify import CertifyOptions, certify
from lipverify.errors import UserInputError
from lipverify.finetune import FinetuneOptions, TrainingInterrupted, finetune
from lipverify.load.model import load_model

torch.set_num_threads(1)

FIX = Path(__file__).resolve().parents[1] / "fixtures"
pytestmark = pytest.mark.skipif(not (FIX / "mlp.onnx").exists() or not (FIX / "digits_train.npz").exists(),
                                reason="fixtures not generated")

FAST = dict(certify_method="product", lower_starts=2, lower_budget_s=0.5, limit=256, batch_size=64)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Small train/val files (a subset of the digits fixtures) and a copy of the models."""
    d = tmp_path_factory.mktemp("ft")
    tr, te = np.load(FIX / "digits_train.npz"), np.load(FIX / "digits_test.npz")
    np.savez(d / "train.npz", x=tr["x"][:256], y=tr["y"][:256])
    np.savez(d / "val.npz", x=te["x"][:128], y=te["y"][:128])
    np.savez(d / "unlabelled.npz", x=tr["x"][:128])
    np.savez(d / "wrong_shape.npz", x=tr["x"][:64, :, :5, :5], y=tr["y"][:64])
    for name in ("mlp.onnx", "mlp.pt", "mlp.safetensors", "mlp.json", "cnn_bn.onnx", "cnn_bn.safetensors", "cnn_bn.json"):
        (d / name).write_bytes((FIX / name).read_bytes())
    return d


def _opts(d, **kw):
    base = dict(FAST, data=str(d / "train.npz"), val=str(d / "val.npz"))
    base.update(kw)
    return FinetuneOptions(**base)


def _sha(p):
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _outputs(path, x, spec=None):
    return load_model(path, (1, 8, 8), spec).reference(x)


def test_exported_file_recertifies_below_target(small):
    out = small / "mlp_L3.onnx"
    r = finetune(small / "mlp.onnx", out, _opts(small, target_L=3.0, method="rslmi", epochs=1))
    assert r.target_met and out.exists()
    # independent re-certification of the file on disk
    again = certify(out, CertifyOptions(method="product", lower_starts=2, lower_budget_s=0.5))
    assert again["certified_bound"] <= 3.0
    cert = json.loads(r.certificate_path.read_text())
    ft = cert["fine_tune"]
    assert cert["certified_bound"] <= 3.0 and ft["output"]["sha256"] == _sha(out) == cert["model"]["sha256"]
    assert ft["source"]["certified_bound"] > 3.0  # the original model did not meet the target
    assert ft["settings"]["seed"] == 0 and ft["settings"]["method"] == "rslmi"
    assert 0.0 <= ft["accuracy_after"] <= 1.0 and ft["accuracy_before"] > 0.9


@pytest.mark.parametrize("name", ["mlp.onnx", "mlp.pt", "mlp.safetensors", "cnn_bn.safetensors"])
def test_round_trip_keeps_the_function(small, name):
    """With no training and a loose target, the exported file computes what the input computes
    (cnn_bn.safetensors: BatchNorm folded for training and written back as an identity BN)."""
    src = small / name
    out = small / f"rt_{name}"
    r = finetune(src, out, _opts(small, target_L=1e9, epochs=0, method="project", input_shape=(1, 8, 8)))
    assert r.target_met and not r.certificate["fine_tune"]["final_correction"]
    x = np.load(small / "val.npz")["x"][:32]
    spec_in = str(src.with_suffix(".json")) if src.suffix == ".safetensors" else None
    spec_out = str(out.with_suffix(".json")) if src.suffix == ".safetensors" else None
    a, b = _outputs(src, x, spec_in), _outputs(out, x, spec_out)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert out.suffix == src.suffix
    if src.suffix == ".safetensors":
        assert json.loads(out.with_suffix(".json").read_text())["layers"] == json.loads(spec_in and Path(spec_in).read_text())["layers"]


def test_no_write_lands_on_the_input_model_its_spec_or_the_data(small):
    """The exported file, the certificate and the checkpoint never overwrite the input model, its
    spec or a data file (no option allows it), nor each other; nothing is written when refused."""
    src = small / "mlp.onnx"
    before = {p: _sha(p) for p in small.iterdir() if p.is_file()}
    refused = [
        (src, {}, "input model"),
        (small / "m2.onnx", {"certificate": str(src)}, "input model"),
        (small / "m2.onnx", {"checkpoint": str(src)}, "input model"),
        (small / "m2.onnx", {"certificate": str(small / "val.npz")}, "data file"),
        (small / "m2.onnx", {"certificate": str(small / "m2.onnx")}, "same file"),
        (small / "x.pt", {}, "format"),
    ]
    for out, kw, match in refused:
        with pytest.raises(UserInputError, match=match):
            finetune(src, out, _opts(small, target_L=2.0, epochs=1, **kw))
    st = small / "cnn_bn.safetensors"
    with pytest.raises(UserInputError, match="input's spec"):  # the certificate over the input's spec
        finetune(st, small / "st2.safetensors", _opts(small, target_L=2.0, epochs=1,
                                                       certificate=str(small / "cnn_bn.json")))
    assert {p: _sha(p) for p in small.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("model,method,extra", [
    ("mlp.onnx", "rslmi", {}),
    ("mlp.onnx", "rslmi", {"sketch_every": 3, "penalty_every": 2}),  # interrupted between two sketch draws
    ("mlp.onnx", "lip-loop", {}),
    ("cnn_bn.onnx", "lip-loop", {"certify_method": "layerwise"}),  # layerwise scalings in the checkpoint
])
def test_resume_gives_the_uninterrupted_result(small, model, method, extra):
    kw = dict(target_L=2.0, method=method, epochs=2, seed=3, **extra)
    tag = f"{model.split('.')[0]}_{method}_{len(extra)}"
    full = small / f"full_{tag}.onnx"
    finetune(small / model, full, _opts(small, **kw))

    part = small / f"part_{tag}.onnx"

    def ctrl_c(epoch, step):
        if (epoch, step) == (0, 2):
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        finetune(small / model, part, _opts(small, **kw), on_step=ctrl_c)
    assert not part.exists() and Path(str(part) + ".ckpt").exists()
    with pytest.raises(UserInputError, match="other settings"):
        finetune(small / model, part, _opts(small, **dict(kw, lr=0.5), resume=True))
    finetune(small / model, part, _opts(small, **kw, resume=True))
    x = np.load(small / "val.npz")["x"]
    np.testing.assert_array_equal(_outputs(full, x), _outputs(part, x))
    assert not Path(str(part) + ".ckpt").exists()


def test_training_meets_the_target_without_the_output_rescale(small):
    """rslmi ends by clipping every layer to its trained budget, so the product bound of the
    exported file meets the target by itself; the certificate says no rescale was applied."""
    r = finetune(small / "mlp.onnx", small / "norescale.onnx", _opts(small, target_L=1.0, epochs=2))
    ft = r.certificate["fine_tune"]
    assert r.target_met and ft["final_correction"] == [] and ft["rescale_factor"] == 1.0
    assert ft["certified_bound_trained"] <= 1.0 and ft["loss"]["kind"] == "margin"


def test_lip_loop_trains_a_cnn_through_layerwise_scalings(small):
    """No dense chain: lip-loop's projection certifies with layerwise scalings, and the exported
    file (convolutions written with their own padding) certifies at what training aimed at."""
    r = finetune(small / "cnn_bn.onnx", small / "c.onnx",
                 _opts(small, target_L=2.0, method="lip-loop", epochs=1, certify_method="layerwise"))
    ft = r.certificate["fine_tune"]
    assert r.target_met and r.certificate["method"] == "layerwise" and ft["rescale_factor"] == 1.0
    assert ft["history"][0]["L_kind"] == "layerwise(W̄)" and ft["history"][0]["L"] <= 2.0
    assert ft["accuracy_after"] > 0.5


def test_distill_works(small):
    r = finetune(small / "mlp.onnx", small / "d.onnx",
                 _opts(small, target_L=4.0, epochs=1, distill=True, data=str(small / "unlabelled.npz")))
    assert r.target_met and r.certificate["fine_tune"]["accuracy_after"] is not None


def test_certified_accuracy_at_several_radii_and_the_project_default_loss(small):
    r = finetune(small / "mlp.onnx", small / "radii.onnx",
                 _opts(small, target_L=2.0, epochs=1, method="project", eps=0.05, more_eps=(0.2,)))
    ft = r.certificate["fine_tune"]
    assert set(ft["certified_accuracy"]) == {"0.05", "0.2"} and ft["loss"]["kind"] == "ce"
    assert ft["certified_accuracy"]["0.05"]["after"] >= ft["certified_accuracy"]["0.2"]["after"]
    assert ft["certified_accuracy"]["0.05"]["after"] == ft["certified_accuracy_after"]


def _cli():
    import typer

    from lipverify.cli_finetune import fine_tune

    app = typer.Typer()
    app.command("fine-tune")(fine_tune)
    app.command("noop")(lambda: None)  # two commands: typer keeps "fine-tune" as a sub-command
    return app


@pytest.mark.parametrize("data,needle,extra", [
    ("wrong_shape.npz", "shape", []), ("unlabelled.npz", "--distill", []),
    ("train.npz", "--loss", ["--loss", "hinge"]), ("train.npz", "--eps", ["--eps", "0.1,x"]),
    ("train.npz", "--beta", ["--beta", "0"]), ("train.npz", "--sketch-every", ["--sketch-every", "0"]),
    ("train.npz", "--device", ["--device", "tpu"]),
])
def test_bad_input_exits_2(small, data, needle, extra):
    from typer.testing import CliRunner

    res = CliRunner().invoke(_cli(), ["fine-tune", str(small / "mlp.onnx"), "--target-L", "2", "--data",
                                      str(small / data), "--out", str(small / "bad.onnx"), "-q", *extra])
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert not (small / "bad.onnx").exists()


def test_cli_success_and_same_path_refusal(small):
    from typer.testing import CliRunner

    runner = CliRunner()
    args = ["fine-tune", str(small / "mlp.onnx"), "--target-L", "3", "--data", str(small / "train.npz"),
            "--val", str(small / "val.npz"), "--epochs", "1", "--certify-method", "product", "--limit", "256"]
    res = runner.invoke(_cli(), args + ["--out", str(small / "cli.onnx")])
    assert res.exit_code == 0, res.output
    assert "certified L" in res.output and (small / "cli.certificate.json").exists()
    res = runner.invoke(_cli(), args + ["--out", str(small / "mlp.onnx")])
    assert res.exit_code == 2 and "refusing" in res.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_matches_the_cpu(small):
    """The same run on the GPU and on the CPU: the same function up to float reduction order."""
    kw = dict(target_L=2.0, epochs=1, certify_method="product")
    cpu = finetune(small / "mlp.onnx", small / "dev_cpu.onnx", _opts(small, **kw))
    gpu = finetune(small / "mlp.onnx", small / "dev_gpu.onnx", _opts(small, device="cuda", **kw))
    assert cpu.target_met and gpu.target_met
    x = np.load(small / "val.npz")["x"]
    np.testing.assert_allclose(_outputs(small / "dev_cpu.onnx", x), _outputs(small / "dev_gpu.onnx", x),
                               rtol=1e-3, atol=1e-3)
