"""Data loading: every format gives the same batches; every bad input is a clear UserInputError."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from lipverify.data import (
    DataSpec,
    check_labels,
    count_samples,
    iter_batches,
    load_all,
    parse_transform,
    sample_indices,
)
from lipverify.errors import UserInputError

torch.set_num_threads(1)


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 16)).astype(np.float32)
    y = rng.integers(0, 3, size=23).astype(np.int64)
    return x, y


def _write_csv(path, x, y, label_pos=0, opener=open):
    cols = [f"f{i}" for i in range(x.shape[1])]
    cols.insert(label_pos, "label")
    with opener(path, "wt") as fh:
        fh.write(",".join(cols) + "\n")
        for xi, yi in zip(x, y):
            cells = [repr(float(v)) for v in xi]
            cells.insert(label_pos, str(int(yi)))
            fh.write(",".join(cells) + "\n")


def _save_all_formats(tmp_path, x, y):
    from safetensors.numpy import save_file

    paths = {}
    paths["npz"] = tmp_path / "d.npz"
    np.savez(paths["npz"], x=x, y=y)
    paths["pt_dict"] = tmp_path / "d.pt"
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, paths["pt_dict"])
    paths["pt_tuple"] = tmp_path / "t.pt"
    torch.save((torch.from_numpy(x), torch.from_numpy(y)), paths["pt_tuple"])
    paths["safetensors"] = tmp_path / "d.safetensors"
    save_file({"x": x, "y": y}, str(paths["safetensors"]))
    paths["csv"] = tmp_path / "d.csv"
    _write_csv(paths["csv"], x, y, label_pos=5)
    paths["csv_gz"] = tmp_path / "d.csv.gz"
    _write_csv(paths["csv_gz"], x, y, label_pos=0, opener=gzip.open)
    return paths


def test_every_array_format_gives_the_same_batches(tmp_path, arrays):
    x, y = arrays
    for name, path in _save_all_formats(tmp_path, x, y).items():
        spec = DataSpec(str(path), batch_size=10)
        batches = list(iter_batches(spec, (1, 4, 4)))
        assert [len(b[0]) for b in batches] == [10, 10, 3], name
        xb = torch.cat([b[0] for b in batches])
        yb = torch.cat([b[1] for b in batches])
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64, name
        assert xb.shape == (23, 1, 4, 4), name
        np.testing.assert_array_equal(xb.reshape(23, 16).numpy(), x, err_msg=name)
        np.testing.assert_array_equal(yb.numpy(), y, err_msg=name)
        assert count_samples(spec) == 23


def test_limit_is_a_seeded_random_subset_in_file_order(tmp_path, arrays):
    x, y = arrays
    y_sorted = np.sort(y)  # a file sorted by label: "the first N" would be one class
    paths = _save_all_formats(tmp_path, x, y_sorted)
    results = {}
    for name, path in paths.items():
        spec = DataSpec(str(path), limit=9, seed=3, batch_size=4)
        assert count_samples(spec) == 9
        xb, yb = load_all(spec, (16,))
        results[name] = (xb.numpy(), yb.numpy())
    ref_x, ref_y = results["npz"]
    for name, (xb, yb) in results.items():  # same subset whatever the format
        np.testing.assert_array_equal(xb, ref_x, err_msg=name)
        np.testing.assert_array_equal(yb, ref_y, err_msg=name)
    rows = [int(np.flatnonzero((x == r).all(axis=1))[0]) for r in ref_x]
    assert rows == sorted(rows) and len(set(rows)) == 9
    assert sample_indices(DataSpec(str(paths["csv"]), limit=9, seed=3)).tolist() == rows
    assert sample_indices(DataSpec(str(paths["npz"]))).tolist() == list(range(23))
    assert len(set(ref_y.tolist())) > 1
    other, _ = load_all(DataSpec(str(paths["npz"]), limit=9, seed=4), (16,))
    assert not np.array_equal(other.numpy(), ref_x)
    # a limit above the size takes everything
    assert count_samples(DataSpec(str(paths["npz"]), limit=1000)) == 23


def test_sparse_safetensors_subset(tmp_path):
    from safetensors.numpy import save_file

    x = np.arange(2000 * 3, dtype=np.float32).reshape(2000, 3)
    y = np.arange(2000) % 5
    save_file({"x": x, "y": y}, str(tmp_path / "big.safetensors"))
    spec = DataSpec(str(tmp_path / "big.safetensors"), limit=7, seed=1, batch_size=7)
    xb, yb = load_all(spec, (3,))
    rows = (xb[:, 0].numpy() / 3).astype(int)
    np.testing.assert_array_equal(xb.numpy(), x[rows])
    np.testing.assert_array_equal(yb.numpy(), y[rows])


def test_progress_callback(tmp_path, arrays):
    x, y = arrays
    np.savez(tmp_path / "d.npz", x=x, y=y)
    calls = []
    list(iter_batches(DataSpec(str(tmp_path / "d.npz"), batch_size=8), (16,), progress=lambda a, t: calls.append((a, t))))
    assert calls == [(8, 23), (8, 23), (7, 23)]


def test_custom_keys_and_missing_keys_listed(tmp_path, arrays):
    x, y = arrays
    np.savez(tmp_path / "d.npz", images=x, targets=y)
    xb, _ = load_all(DataSpec(str(tmp_path / "d.npz"), x_key="images", y_key="targets"), (16,))
    assert xb.shape == (23, 16)
    with pytest.raises(UserInputError, match=r"no array named 'x' \(present: 'images', 'targets'\)"):
        load_all(DataSpec(str(tmp_path / "d.npz")), (16,))
    torch.save({"inputs": torch.zeros(2, 16), "y": torch.zeros(2)}, tmp_path / "d.pt")
    with pytest.raises(UserInputError, match="'inputs'"):
        load_all(DataSpec(str(tmp_path / "d.pt")), (16,))


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors", ".csv"])
def test_corrupt_and_missing_files(tmp_path, suffix):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(b"\x00\x01garbage\xff" * 10 if suffix != ".csv" else b"")
    with pytest.raises(UserInputError, match=str(bad.name)):
        load_all(DataSpec(str(bad)), (16,))
    with pytest.raises(UserInputError, match="not found"):
        load_all(DataSpec(str(tmp_path / f"missing{suffix}")), (16,))


def test_unknown_format(tmp_path):
    (tmp_path / "d.txt").write_text("1,2")
    with pytest.raises(UserInputError, match="unknown data format"):
        count_samples(DataSpec(str(tmp_path / "d.txt")))


def test_shape_errors_name_both_shapes(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 10), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(UserInputError, match=r"shape \(10,\).*expects \(1, 28, 28\)"):
        load_all(DataSpec(str(tmp_path / "d.npz")), (1, 28, 28))
    # channels-last with the right element count is refused, not scrambled by a reshape
    np.savez(tmp_path / "hwc.npz", x=np.zeros((4, 8, 8, 3), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(UserInputError, match="channels-last"):
        load_all(DataSpec(str(tmp_path / "hwc.npz")), (3, 8, 8))
    # a missing singleton channel axis is fine
    np.savez(tmp_path / "hw.npz", x=np.ones((4, 8, 8), np.float32), y=np.zeros(4, np.int64))
    assert load_all(DataSpec(str(tmp_path / "hw.npz")), (1, 8, 8))[0].shape == (4, 1, 8, 8)


def test_label_errors(tmp_path):
    x = np.zeros((3, 2), np.float32)
    np.savez(tmp_path / "a.npz", x=x, y=np.array([0.0, 1.0, 2.0]))  # integral floats are fine
    assert load_all(DataSpec(str(tmp_path / "a.npz")), (2,))[1].tolist() == [0, 1, 2]
    np.savez(tmp_path / "b.npz", x=x, y=np.array([0.0, 1.5, 2.0]))
    with pytest.raises(UserInputError, match="labels must be integers.*1.5"):
        load_all(DataSpec(str(tmp_path / "b.npz")), (2,))
    np.savez(tmp_path / "c.npz", x=x, y=np.eye(3))
    with pytest.raises(UserInputError, match="one-hot"):
        load_all(DataSpec(str(tmp_path / "c.npz")), (2,))
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1]))
    with pytest.raises(UserInputError, match="3 samples but y has 2"):
        load_all(DataSpec(str(tmp_path / "d.npz")), (2,))
    np.savez(tmp_path / "e.npz", x=x, y=np.array(["a", "b", "c"]))
    with pytest.raises(UserInputError, match="integers"):
        load_all(DataSpec(str(tmp_path / "e.npz")), (2,))
    check_labels(np.array([0, 9]), 10)
    with pytest.raises(UserInputError, match="label 10 is out of range.*10 logits"):
        check_labels(torch.tensor([0, 10]), 10)


def test_nan_and_empty(tmp_path):
    x = np.zeros((5, 2), np.float32)
    x[3, 1] = np.nan
    np.savez(tmp_path / "n.npz", x=x, y=np.zeros(5, np.int64))
    with pytest.raises(UserInputError, match="sample 3 contains NaN"):
        load_all(DataSpec(str(tmp_path / "n.npz"), batch_size=2), (2,))
    np.savez(tmp_path / "e.npz", x=np.zeros((0, 2), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(UserInputError, match="empty"):
        load_all(DataSpec(str(tmp_path / "e.npz")), (2,))
    (tmp_path / "e.csv").write_text("label,a,b\n")
    with pytest.raises(UserInputError, match="empty"):
        load_all(DataSpec(str(tmp_path / "e.csv")), (2,))


def test_csv_errors(tmp_path):
    (tmp_path / "a.csv").write_text("label,a,b\n0,1.0,2.0\n1,0.5,oops\n")
    with pytest.raises(UserInputError, match=r"line 3, column 3 \('b'\): 'oops' is not a number"):
        load_all(DataSpec(str(tmp_path / "a.csv")), (2,))
    (tmp_path / "b.csv").write_text("0,1.0,2.0\n1,0.5,0.1\n")
    with pytest.raises(UserInputError, match="header row"):
        load_all(DataSpec(str(tmp_path / "b.csv")), (2,))
    (tmp_path / "c.csv").write_text("target,a,b\n0,1.0,2.0\n")
    with pytest.raises(UserInputError, match=r"no column named 'label' \(present: 'target', 'a', 'b'\)"):
        load_all(DataSpec(str(tmp_path / "c.csv")), (2,))
    assert load_all(DataSpec(str(tmp_path / "c.csv"), label_column="target"), (2,))[1].tolist() == [0]
    (tmp_path / "d.csv").write_text("label,a,b\n0,1.0\n")
    with pytest.raises(UserInputError, match="line 2 has 2 fields but the header has 3"):
        load_all(DataSpec(str(tmp_path / "d.csv")), (2,))


def test_transform_grammar():
    t = parse_transform("resize=28,grayscale,to_tensor,normalize=0.1307/0.3081")
    assert [s.name for s in t.image_steps] == ["resize", "grayscale"]
    assert [s.name for s in t.tensor_steps] == ["to_tensor", "normalize"]
    assert t.tensor_steps[1].value == ([0.1307], [0.3081])
    t = parse_transform("normalize=0.5:0.5:0.5/0.2:0.2:0.2, scale=1/255")
    assert t.tensor_steps[0].value == ([0.5] * 3, [0.2] * 3)
    assert t.tensor_steps[1].value == pytest.approx(1 / 255)
    for bad, msg in [
        ("blur=3", "unknown step 'blur'"),
        ("normalize=0.5:0.5/0.2", "2 means but 1 stds"),
        ("normalize=0.5/0", "std must be positive"),
        ("normalize=0.5", "MEAN/STD"),
        ("resize=0", "positive integers"),
        ("to_tensor,resize=8", "before to_tensor"),
        ("grayscale=1", "takes no value"),
        ("scale", "needs a value"),
    ]:
        with pytest.raises(UserInputError, match=msg):
            parse_transform(bad)


def test_tensor_transforms_on_arrays(tmp_path):
    x = (np.arange(24).reshape(2, 12) * 10).astype(np.uint8)
    np.savez(tmp_path / "u8.npz", x=x, y=np.array([0, 1]))
    spec = DataSpec(str(tmp_path / "u8.npz"), transform="to_tensor,normalize=0.5:0.1:0.2/0.5:0.25:1")
    xb, _ = load_all(spec, (3, 2, 2))
    ref = x.reshape(2, 3, 2, 2) / 255.0
    ref = (ref - np.array([0.5, 0.1, 0.2])[None, :, None, None]) / np.array([0.5, 0.25, 1])[None, :, None, None]
    np.testing.assert_allclose(xb.numpy(), ref, rtol=1e-6)
    with pytest.raises(UserInputError, match="image folders only"):
        load_all(DataSpec(str(tmp_path / "u8.npz"), transform="resize=4"), (12,))
    with pytest.raises(UserInputError, match="2 channel values but the samples have 3"):
        load_all(DataSpec(str(tmp_path / "u8.npz"), transform="normalize=0:0/1:1"), (3, 2, 2))


def _make_image_folder(root, rng):
    from PIL import Image

    files = []
    for cls in ["cat", "ant", "bee"]:  # label order: ant=0, bee=1, cat=2
        (root / cls).mkdir(parents=True)
        for k in range(4):
            arr = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
            p = root / cls / f"img{k}.png"
            Image.fromarray(arr).save(p)
            files.append((p, cls))
    (root / "cat" / "notes.txt").write_text("not an image")
    return files


def test_image_folder_transform_and_labels(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    _make_image_folder(root, np.random.default_rng(0))
    spec = DataSpec(str(root), transform="resize=8x8,grayscale,to_tensor,normalize=0.5/0.25", batch_size=5)
    assert count_samples(spec) == 12
    xb, yb = load_all(spec, (1, 8, 8))
    assert xb.shape == (12, 1, 8, 8)
    assert yb.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    with Image.open(root / "bee" / "img2.png") as img:
        ref = np.asarray(img.resize((8, 8), Image.BILINEAR).convert("L"), dtype=np.float64) / 255.0
    np.testing.assert_allclose(xb[6, 0].numpy(), (ref - 0.5) / 0.25, atol=1e-6)
    # per-channel normalize on RGB, resize of the shorter side (10x12 -> 6x7), centre crop 6x6
    spec = DataSpec(str(root), transform="resize=6,center_crop=6,normalize=0.5:0.5:0.5/0.2:0.2:0.2")
    xb, _ = load_all(spec, (3, 6, 6))
    assert xb.shape == (12, 3, 6, 6) and float(xb.min()) >= -2.5 - 1e-6 and float(xb.max()) <= 2.5 + 1e-6
    with pytest.raises(UserInputError, match=r"\(3, 10, 12\) but the model expects \(1, 10, 12\)"):
        load_all(DataSpec(str(root)), (1, 10, 12))


def test_image_folder_streams_one_batch_at_a_time(tmp_path, monkeypatch):
    from PIL import Image

    root = tmp_path / "imgs"
    _make_image_folder(root, np.random.default_rng(1))
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    it = iter_batches(DataSpec(str(root), batch_size=3), (3, 10, 12))
    first = next(it)
    assert first[0].shape == (3, 3, 10, 12)
    assert len(opened) == 3
    assert len(list(it)) == 3 and len(opened) == 12


def test_image_folder_errors(tmp_path):
    from PIL import Image

    (tmp_path / "flat").mkdir()
    with pytest.raises(UserInputError, match="one sub-folder per class"):
        count_samples(DataSpec(str(tmp_path / "flat")))
    root = tmp_path / "mixed"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "a" / "1.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "a" / "2.png")
    with pytest.raises(UserInputError, match="resize=HxW"):
        load_all(DataSpec(str(root)), (1, 4, 4))
    (root / "a" / "3.png").write_bytes(b"not a png")
    with pytest.raises(UserInputError, match="cannot read image"):
        load_all(DataSpec(str(root), transform="resize=4x4"), (1, 4, 4))
