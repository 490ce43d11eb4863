"""Load the user's labelled data for certified radii, in batches.

Formats (chosen by the path):

- ``.npz``: arrays named ``x_key`` / ``y_key``.
- ``.pt`` / ``.pth``: a dict holding ``x_key`` / ``y_key``, or a tuple/list ``(x, y)``; loaded with
  ``torch.load(weights_only=True)`` so a data file can never run code.
- ``.safetensors``: tensors named ``x_key`` / ``y_key``; read slice by slice (streamed).
- ``.csv`` / ``.csv.gz``: a header row, one sample per row: the ``label_column`` and the
  flattened features in the other columns (in column order). Streamed row by row.
- a folder of images: one sub-folder per class; classes sorted by name give the label indices
  (the torchvision ``ImageFolder`` convention). Streamed: at most one batch of images is decoded
  at a time.

Shapes. ``input_shape`` is the per-sample shape the model takes (no batch dimension). Samples
are reshaped to it when they are flat (``[N, prod(input_shape)]``, e.g. CSV rows) or differ only
by size-1 dimensions (``[N, 28, 28]`` for ``(1, 28, 28)``). Any other shape with the same number
of elements (e.g. channels-last ``[N, 32, 32, 3]`` for ``(3, 32, 32)``) is refused rather than
silently scrambled by a reshape.

``--limit N``: a random subset of N samples drawn with ``numpy.random.default_rng(seed)``,
yielded in file order. Random rather than "the first N" because data files are often sorted by
label (the first 500 rows of a sorted MNIST file are all zeros); seeded so runs are repeatable.

Transform grammar (``--transform``): comma-separated steps, each ``name`` or ``name=value``::

    resize=N        shorter image side to N pixels, aspect kept (torchvision Resize(N)), bilinear
    resize=HxW      exactly H rows by W columns, bilinear
    center_crop=N   (or HxW) central crop
    grayscale       convert to one channel (PIL "L")
    rgb             convert to three channels
    to_tensor       image -> float32 [C, H, W] in [0, 1]; on arrays: integer dtypes are divided
                    by 255 (CSV cells are read as floats: use scale=1/255 for 0-255 pixel values)
    scale=A         multiply by A (A may be a fraction such as 1/255)
    normalize=M/S   (x - M) / S; per channel with ':' between values, e.g. 0.5:0.5:0.5/0.2:0.2:0.2

Image steps (resize, center_crop, grayscale, rgb) apply to image folders only and come before
``to_tensor``; an image folder gets an implicit ``to_tensor`` after them. Tensor steps
(to_tensor, scale, normalize) also apply to array formats, after the reshape to ``input_shape``;
``normalize`` acts on the first (channel) axis of ``input_shape``.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from lipverify.errors import UserInputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

Progress = Callable[[int, "int | None"], None]


@dataclass
class DataSpec:
    """Where the data is and how to read it (mirrors the CLI options)."""

    path: str
    x_key: str = "x"
    y_key: str = "y"
    label_column: str = "label"
    transform: str | None = None
    limit: int | None = None
    seed: int = 0
    batch_size: int = 256


# --------------------------------------------------------------------------- transform grammar


@dataclass
class _Step:
    name: str
    value: object = None


@dataclass
class Transform:
    """A parsed ``--transform``: image steps (PIL) then tensor steps (float arrays)."""

    image_steps: list[_Step]
    tensor_steps: list[_Step]
    has_to_tensor: bool

    def apply_image(self, img) -> np.ndarray:
        """PIL image -> float32 [C, H, W] in [0, 1] after the image steps (implicit to_tensor)."""
        from PIL import Image

        for step in self.image_steps:
            if step.name == "grayscale":
                img = img.convert("L")
            elif step.name == "rgb":
                img = img.convert("RGB")
            elif step.name == "resize":
                h, w = _resize_target(step.value, img.size)
                img = img.resize((w, h), Image.BILINEAR)
            elif step.name == "center_crop":
                ch, cw = step.value
                w, h = img.size
                if ch > h or cw > w:
                    raise UserInputError(
                        f"center_crop={ch}x{cw} is larger than the image ({h}x{w}); resize first"
                    )
                top = int(round((h - ch) / 2.0))
                left = int(round((w - cw) / 2.0))
                img = img.crop((left, top, left + cw, top + ch))
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if arr.ndim == 2:
            arr = arr[None]
        else:
            arr = np.ascontiguousarray(arr.transpose(2, 0, 1))
        return arr

    def apply_tensor(self, x: np.ndarray, raw_integer: bool) -> np.ndarray:
        """Tensor steps on a float batch [B, C, ...] (``raw_integer``: the file held integers)."""
        for step in self.tensor_steps:
            if step.name == "to_tensor":
                if raw_integer:
                    x = x / 255.0
            elif step.name == "scale":
                x = x * step.value
            elif step.name == "normalize":
                mean, std = step.value
                if x.ndim < 2:
                    raise UserInputError("normalize needs samples with a channel axis")
                c = x.shape[1]
                if len(mean) not in (1, c):
                    raise UserInputError(
                        f"normalize gives {len(mean)} channel values but the samples have {c} "
                        f"channels (first axis of the input shape {tuple(x.shape[1:])})"
                    )
                shape = (1, -1) + (1,) * (x.ndim - 2)
                x = (x - np.asarray(mean, dtype=np.float64).reshape(shape)) / np.asarray(
                    std, dtype=np.float64
                ).reshape(shape)
        return x


def _parse_number(text: str, step: str) -> float:
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise UserInputError(f"--transform: {step}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise UserInputError(f"--transform: {step}: {text!r} is not finite")
    return value


def _parse_size(text: str, step: str) -> tuple[int, int] | int:
    try:
        if "x" in text:
            h, w = text.split("x", 1)
            size: tuple[int, int] | int = (int(h), int(w))
            ok = min(size) > 0
        else:
            size = int(text)
            ok = size > 0
    except ValueError:
        ok = False
    if not ok:
        raise UserInputError(f"--transform: {step}={text}: expected N or HxW with positive integers")
    return size


def _resize_target(size, wh: tuple[int, int]) -> tuple[int, int]:
    w, h = wh
    if isinstance(size, tuple):
        return size
    # torchvision Resize(int): the shorter side becomes ``size``, aspect ratio kept.
    if h <= w:
        return size, max(1, int(size * w / h))
    return max(1, int(size * h / w)), size


_IMAGE_STEPS = {"resize", "center_crop", "grayscale", "rgb"}
_TENSOR_STEPS = {"to_tensor", "scale", "normalize"}


def parse_transform(text: str | None) -> Transform:
    """Parse the ``--transform`` grammar (see the module docstring); errors name the bad step."""
    image_steps: list[_Step] = []
    tensor_steps: list[_Step] = []
    has_to_tensor = False
    if not text or not text.strip():
        return Transform(image_steps, tensor_steps, False)
    for raw in text.split(","):
        raw = raw.strip()
        if not raw:
            continue
        name, _, value = raw.partition("=")
        name = name.strip().lower().replace("-", "_")
        value = value.strip()
        if name not in _IMAGE_STEPS | _TENSOR_STEPS:
            known = ", ".join(sorted(_IMAGE_STEPS | _TENSOR_STEPS))
            raise UserInputError(f"--transform: unknown step {name!r} (known: {known})")
        needs_value = name in {"resize", "center_crop", "scale", "normalize"}
        if needs_value and not value:
            raise UserInputError(f"--transform: step {name!r} needs a value ({name}=...)")
        if not needs_value and value:
            raise UserInputError(f"--transform: step {name!r} takes no value")
        if name in _IMAGE_STEPS:
            if has_to_tensor or tensor_steps:
                raise UserInputError(
                    f"--transform: image step {name!r} must come before to_tensor/scale/normalize"
                )
            if name == "resize":
                image_steps.append(_Step(name, _parse_size(value, name)))
            elif name == "center_crop":
                size = _parse_size(value, name)
                image_steps.append(_Step(name, size if isinstance(size, tuple) else (size, size)))
            else:
                image_steps.append(_Step(name))
        elif name == "to_tensor":
            if has_to_tensor:
                raise UserInputError("--transform: to_tensor given twice")
            has_to_tensor = True
            tensor_steps.append(_Step(name))
        elif name == "scale":
            tensor_steps.append(_Step(name, _parse_number(value, name)))
        else:  # normalize
            if value.count("/") != 1:
                raise UserInputError(
                    f"--transform: normalize={value}: expected MEAN/STD, per channel with ':' "
                    "(e.g. normalize=0.5:0.5:0.5/0.2:0.2:0.2)"
                )
            m_text, s_text = value.split("/")
            mean = [_parse_number(v, name) for v in m_text.split(":")]
            std = [_parse_number(v, name) for v in s_text.split(":")]
            if len(mean) != len(std):
                raise UserInputError(
                    f"--transform: normalize={value}: {len(mean)} means but {len(std)} stds"
                )
            if any(s <= 0 for s in std):
                raise UserInputError(f"--transform: normalize={value}: std must be positive")
            tensor_steps.append(_Step(name, (mean, std)))
    return Transform(image_steps, tensor_steps, has_to_tensor)


# --------------------------------------------------------------------------- format readers
#
# Each reader exposes ``n`` (sample count, before --limit) and ``read(indices)`` -> (x, y) numpy
# arrays for sorted indices; ``iter_batches`` does the limit, reshape, checks and transform once.


class _ArrayReader:
    """x and y as in-memory (or lazily sliced) arrays."""

    def __init__(self, x, y, path: str):
        self.x = x
        self.y = y
        self.path = path
        self.n = _length(x)
        ny = _length(y)
        if ny != self.n:
            raise UserInputError(f"{path}: x has {self.n} samples but y has {ny} labels")
        self.raw_integer = _is_integer_dtype(x)

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _to_numpy(_take(self.x, idx)), _to_numpy(_take(self.y, idx))

    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])


class _SafetensorsSlice:
    """Lazy row access to one tensor of a safetensors file (safe_open slices read only those rows)."""

    def __init__(self, handle, key: str):
        self._slice = handle.get_slice(key)
        self.shape = tuple(self._slice.get_shape())
        self.dtype = self._slice.get_dtype()

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def take(self, idx: np.ndarray):
        if len(idx) == 0:
            return torch.zeros((0,) + self.shape[1:])
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if hi - lo <= 4 * len(idx):  # dense enough: one contiguous read
            block = self._slice[lo:hi]
            return block[torch.as_tensor(idx - lo)]
        # a sparse random subset: read row by row so memory stays one batch
        return torch.cat([self._slice[int(i) : int(i) + 1] for i in idx])


def _length(a) -> int:
    if isinstance(a, _SafetensorsSlice):
        return len(a)
    shape = getattr(a, "shape", None)
    if shape is None or len(shape) == 0:
        raise UserInputError("data arrays must have a leading sample dimension (got a scalar)")
    return int(shape[0])


def _take(a, idx: np.ndarray):
    if isinstance(a, _SafetensorsSlice):
        return a.take(idx)
    if isinstance(a, torch.Tensor):
        return a[torch.as_tensor(idx)]
    return a[idx]


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        if a.dtype == torch.bfloat16 or a.dtype == torch.float16:
            a = a.float()
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _is_integer_dtype(a) -> bool:
    if isinstance(a, _SafetensorsSlice):
        return a.dtype.upper().startswith(("I", "U"))  # I8.., U8..
    if isinstance(a, torch.Tensor):
        return not a.dtype.is_floating_point and not a.dtype.is_complex and a.dtype != torch.bool
    return np.issubdtype(np.asarray(a[:0]).dtype, np.integer)


def _missing_key(path: str, kind: str, key: str, present: Sequence[str], option: str) -> UserInputError:
    names = ", ".join(repr(p) for p in present) or "none"
    return UserInputError(f"{path}: no {kind} named {key!r} (present: {names}); choose it with {option}")


def _open_npz(spec: DataSpec) -> _ArrayReader:
    try:
        archive = np.load(spec.path, allow_pickle=False)
    except Exception as exc:  # zipfile.BadZipFile, OSError, ValueError...
        raise UserInputError(f"{spec.path}: cannot read as .npz ({exc})") from None
    if not hasattr(archive, "files"):
        raise UserInputError(f"{spec.path}: a single .npy array, not an .npz archive of named arrays")
    for key, option in ((spec.x_key, "--x-key"), (spec.y_key, "--y-key")):
        if key not in archive.files:
            raise _missing_key(spec.path, "array", key, archive.files, option)
    try:
        x, y = archive[spec.x_key], archive[spec.y_key]
    except Exception as exc:
        raise UserInputError(f"{spec.path}: corrupt array in .npz ({exc})") from None
    return _ArrayReader(x, y, spec.path)


def _open_pt(spec: DataSpec) -> _ArrayReader:
    try:
        obj = torch.load(spec.path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserInputError(
            f"{spec.path}: cannot read as a torch file of tensors ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); save a dict of tensors with torch.save"
        ) from None
    if isinstance(obj, dict):
        for key, option in ((spec.x_key, "--x-key"), (spec.y_key, "--y-key")):
            if key not in obj:
                raise _missing_key(spec.path, "entry", key, [str(k) for k in obj], option)
        x, y = obj[spec.x_key], obj[spec.y_key]
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = obj
    else:
        raise UserInputError(
            f"{spec.path}: expected a dict with {spec.x_key!r}/{spec.y_key!r} or a pair (x, y), "
            f"found {type(obj).__name__}"
        )
    for name, a in (("x", x), ("y", y)):
        if not isinstance(a, (torch.Tensor, np.ndarray)):
            raise UserInputError(f"{spec.path}: {name} is a {type(a).__name__}, not a tensor")
    return _ArrayReader(x, y, spec.path)


def _open_safetensors(spec: DataSpec) -> _ArrayReader:
    from safetensors import safe_open

    try:
        handle = safe_open(spec.path, framework="pt")
        keys = list(handle.keys())
    except Exception as exc:
        raise UserInputError(f"{spec.path}: cannot read as .safetensors ({exc})") from None
    for key, option in ((spec.x_key, "--x-key"), (spec.y_key, "--y-key")):
        if key not in keys:
            raise _missing_key(spec.path, "tensor", key, keys, option)
    x = _SafetensorsSlice(handle, spec.x_key)
    y = _SafetensorsSlice(handle, spec.y_key)
    reader = _ArrayReader(x, y, spec.path)
    reader._handle = handle  # keep the file open as long as the reader lives
    return reader


class _CsvReader:
    """Streams a CSV with a header row; the label column may be anywhere."""

    def __init__(self, spec: DataSpec):
        self.path = spec.path
        self.label_column = spec.label_column
        with self._open() as fh:
            try:
                header = next(csv.reader(fh))
            except StopIteration:
                raise UserInputError(f"{self.path}: empty CSV file") from None
            except (csv.Error, UnicodeDecodeError, OSError, EOFError) as exc:
                raise UserInputError(f"{self.path}: cannot read as CSV ({exc})") from None
            header = [h.strip() for h in header]
            if spec.label_column not in header:
                if all(_is_number(h) for h in header):
                    raise UserInputError(
                        f"{self.path}: the first row is numeric: a header row naming the columns "
                        f"(one of them {spec.label_column!r}) is required"
                    )
                raise _missing_key(self.path, "column", spec.label_column, header, "--label-column")
            self.header = header
            self.label_idx = header.index(spec.label_column)
            self.n = 0
            try:
                for row in csv.reader(fh):
                    if row and any(c.strip() for c in row):
                        self.n += 1
            except (csv.Error, UnicodeDecodeError, OSError, EOFError) as exc:
                raise UserInputError(f"{self.path}: cannot read as CSV ({exc})") from None
        self.raw_integer = False

    def _open(self):
        try:
            if self.path.endswith(".gz"):
                return io.TextIOWrapper(gzip.open(self.path, "rb"), encoding="utf-8", newline="")
            return open(self.path, encoding="utf-8", newline="")
        except OSError as exc:
            raise UserInputError(f"{self.path}: cannot open ({exc})") from None

    def sample_shape(self) -> tuple[int, ...]:
        return (len(self.header) - 1,)

    def iter_rows(self, wanted: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Parse only the wanted data rows (sorted indices), ``batch_size`` at a time."""
        width = len(self.header)
        xs: list[list[float]] = []
        ys: list[float] = []
        pos = 0  # index into wanted
        data_row = -1
        with self._open() as fh:
            reader = csv.reader(fh)
            next(reader)
            for row in reader:
                if not row or not any(c.strip() for c in row):
                    continue
                data_row += 1
                if pos >= len(wanted):
                    break
                if data_row != wanted[pos]:
                    continue
                pos += 1
                line = reader.line_num
                if len(row) != width:
                    raise UserInputError(
                        f"{self.path}: line {line} has {len(row)} fields but the header has {width}"
                    )
                values = []
                for j, cell in enumerate(row):
                    try:
                        values.append(float(cell))
                    except ValueError:
                        raise UserInputError(
                            f"{self.path}: line {line}, column {j + 1} ({self.header[j]!r}): "
                            f"{cell!r} is not a number"
                        ) from None
                ys.append(values.pop(self.label_idx))
                xs.append(values)
                if len(xs) == batch_size:
                    yield np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
                    xs, ys = [], []
        if xs:
            yield np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class _ImageFolderReader:
    """class-per-sub-folder images; only file names are held in memory."""

    def __init__(self, spec: DataSpec):
        root = Path(spec.path)
        self.path = spec.path
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise UserInputError(
                f"{spec.path}: an image folder needs one sub-folder per class (none found)"
            )
        self.classes = classes
        self.files: list[tuple[Path, int]] = []
        for label, name in enumerate(classes):
            for dirpath, dirnames, filenames in os.walk(root / name):
                dirnames.sort()
                for fname in sorted(filenames):
                    if fname.lower().endswith(IMAGE_EXTENSIONS):
                        self.files.append((Path(dirpath) / fname, label))
        self.n = len(self.files)
        self.raw_integer = False

    def iter_images(
        self, wanted: np.ndarray, batch_size: int, transform: Transform
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        from PIL import Image, UnidentifiedImageError

        for start in range(0, len(wanted), batch_size):
            xs, ys = [], []
            for i in wanted[start : start + batch_size]:
                fpath, label = self.files[int(i)]
                try:
                    with Image.open(fpath) as img:
                        img.load()
                        arr = transform.apply_image(img)
                except (UnidentifiedImageError, OSError, SyntaxError) as exc:
                    raise UserInputError(f"{fpath}: cannot read image ({exc})") from None
                if xs and arr.shape != xs[0].shape:
                    raise UserInputError(
                        f"{fpath}: image tensor shape {arr.shape} differs from {xs[0].shape} of "
                        "the other images; add resize=HxW (and grayscale/rgb) to --transform"
                    )
                xs.append(arr)
                ys.append(label)
            yield np.stack(xs), np.asarray(ys, dtype=np.int64)


def _open(spec: DataSpec):
    path = spec.path
    if not os.path.exists(path):
        raise UserInputError(f"data file not found: {path}")
    if os.path.isdir(path):
        return _ImageFolderReader(spec)
    lower = path.lower()
    if lower.endswith(".npz"):
        return _open_npz(spec)
    if lower.endswith((".pt", ".pth")):
        return _open_pt(spec)
    if lower.endswith(".safetensors"):
        return _open_safetensors(spec)
    if lower.endswith((".csv", ".csv.gz")):
        return _CsvReader(spec)
    raise UserInputError(
        f"{path}: unknown data format (use .npz, .pt, .safetensors, .csv, .csv.gz or a folder of "
        "class sub-folders of images)"
    )


# --------------------------------------------------------------------------- checks


def _check_spec(spec: DataSpec) -> None:
    if spec.batch_size < 1:
        raise UserInputError(f"batch size must be positive, got {spec.batch_size}")
    if spec.limit is not None and spec.limit < 1:
        raise UserInputError(f"--limit must be positive, got {spec.limit}")


def _selection(n: int, spec: DataSpec) -> np.ndarray:
    """Sorted indices of the samples to use: all, or a seeded random subset of ``limit``."""
    if spec.limit is None or spec.limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(spec.seed)
    return np.sort(rng.choice(n, size=spec.limit, replace=False))


def _fit_shape(x: np.ndarray, input_shape: tuple[int, ...], path: str) -> np.ndarray:
    """Reshape a batch to ``[B, *input_shape]`` when that cannot scramble the layout."""
    sample = tuple(x.shape[1:])
    if sample == input_shape:
        return x
    want = int(np.prod(input_shape)) if input_shape else 1
    have = int(np.prod(sample)) if sample else 1
    squeeze = tuple(d for d in sample if d != 1) == tuple(d for d in input_shape if d != 1)
    if have == want and (len(sample) <= 1 or squeeze):
        return x.reshape((x.shape[0],) + input_shape)
    hint = ""
    if have == want:
        hint = " (same number of elements but a different layout: channels-last? transpose to channels-first)"
    raise UserInputError(
        f"{path}: samples have shape {sample} but the model expects {input_shape}{hint}"
    )


def _check_labels_integral(y: np.ndarray, path: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise UserInputError(
            f"{path}: labels must be one class index per sample, got shape {tuple(y.shape)}"
            + (" (one-hot? store argmax instead)" if y.ndim == 2 else "")
        )
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise UserInputError(f"{path}: labels must be integers, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            k = int(np.argmax(bad))
            raise UserInputError(f"{path}: labels must be integers, found {y[k]!r}")
    yi = y.astype(np.int64)
    if (yi < 0).any():
        raise UserInputError(f"{path}: labels must be non-negative class indices, found {int(yi.min())}")
    return yi


def check_labels(y, num_classes: int) -> None:
    """Refuse labels outside ``[0, num_classes)`` (the model has ``num_classes`` logits)."""
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if y.size == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise UserInputError(
            f"label {bad} is out of range: the model has {num_classes} logits (labels 0..{num_classes - 1})"
        )


# --------------------------------------------------------------------------- public API


def count_samples(spec: DataSpec) -> int | None:
    """Number of samples ``iter_batches`` will yield (after ``limit``)."""
    _check_spec(spec)
    reader = _open(spec)
    n = reader.n
    return n if spec.limit is None else min(n, spec.limit)


def sample_indices(spec: DataSpec) -> np.ndarray:
    """Dataset positions of the samples ``iter_batches`` yields, in order (for the radii CSV)."""
    _check_spec(spec)
    return _selection(_open(spec).n, spec)


def iter_batches(
    spec: DataSpec, input_shape: tuple[int, ...], progress: Progress | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x float32 [B, *input_shape], y int64 [B])`` batches; see the module docstring.

    ``progress(advance, total)`` is called after each batch with its size and the total count.
    Every check (shape, labels, NaN) runs per batch, so an error names the sample it found.
    """
    _check_spec(spec)
    input_shape = tuple(int(d) for d in input_shape)
    transform = parse_transform(spec.transform)
    reader = _open(spec)
    if reader.n == 0:
        raise UserInputError(f"{spec.path}: the dataset is empty")
    wanted = _selection(reader.n, spec)
    total = len(wanted)

    if isinstance(reader, _ImageFolderReader):
        batches = reader.iter_images(wanted, spec.batch_size, transform)
    else:
        if transform.image_steps:
            names = ", ".join(s.name for s in transform.image_steps)
            raise UserInputError(
                f"--transform: {names} apply to image folders only; {spec.path} holds arrays"
            )
        # Refuse a shape mismatch before reading anything.
        _fit_shape(np.zeros((0,) + reader.sample_shape()), input_shape, spec.path)
        if isinstance(reader, _CsvReader):
            batches = reader.iter_rows(wanted, spec.batch_size)
        else:
            batches = (
                reader.read(wanted[s : s + spec.batch_size]) for s in range(0, total, spec.batch_size)
            )

    done = 0
    for xb, yb in batches:
        xb = np.asarray(xb)
        if xb.dtype == np.bool_ or not (
            np.issubdtype(xb.dtype, np.integer) or np.issubdtype(xb.dtype, np.floating)
        ):
            raise UserInputError(f"{spec.path}: x must be numeric, got dtype {xb.dtype}")
        yb = _check_labels_integral(yb, spec.path)
        if len(yb) != len(xb):
            raise UserInputError(f"{spec.path}: {len(xb)} samples but {len(yb)} labels")
        xb = _fit_shape(xb, input_shape, spec.path).astype(np.float64, copy=False)
        xb = transform.apply_tensor(xb, raw_integer=getattr(reader, "raw_integer", False))
        finite = np.isfinite(xb.reshape(len(xb), -1)).all(axis=1)
        if not finite.all():
            k = int(np.argmin(finite))
            raise UserInputError(
                f"{spec.path}: sample {int(wanted[done + k])} contains NaN or infinite values"
            )
        done += len(xb)
        yield torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32)), torch.from_numpy(yb)
        if progress is not None:
            progress(len(xb), total)


def load_all(spec: DataSpec, input_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples at once (for small sets and tests)."""
    xs, ys = [], []
    for xb, yb in iter_batches(spec, input_shape):
        xs.append(xb)
        ys.append(yb)
    return torch.cat(xs), torch.cat(ys)


def data_sha256(path) -> str | None:
    """sha256 of a data file (of the sorted (relative path, file hash) list for an image folder)."""
    from lipverify.load.model import sha256_file

    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        import hashlib

        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f"{f.relative_to(p)}\0{sha256_file(f)}\n".encode())
        return h.hexdigest()
    return None
