"""Writers that never leave a partial file and never touch the user's input."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from lipverify.errors import UserInputError


def atomic_write_bytes(path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename: a reader never sees a partial file,
    and Ctrl-C leaves the old file (or none) in place."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{path}: is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserInputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise UserInputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable(path) -> None:
    """Refuse, before any work, an output path that cannot be written: a directory, a file whose
    nearest existing folder is not a folder or not writable (missing folders are created later)."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{path}: is a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserInputError(f"cannot write {path}: permission denied")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserInputError(f"cannot write {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserInputError(f"cannot write {path}: folder {parent} is not writable")


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item"):
        return obj.item()
    return obj


def write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list) -> dict:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(repr(key))
        obj[key] = value
    return obj


def _json_int(text: str):
    """An integer literal; one too large for a float reads as +-inf (rejected as not finite where a number
    is checked) instead of an OverflowError later."""
    return int(text) if len(text.lstrip("-")) <= 300 else float("-inf" if text.startswith("-") else "inf")


def read_json_object(path, what: str = "JSON file") -> dict:
    """A JSON object from ``path``, or a clear error (exit 2)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such {what}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys, parse_int=_json_int)
    except _DuplicateKey as exc:
        raise UserInputError(f"{path}: not a {what} (the key {exc} appears twice: readers disagree on which counts)")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserInputError(f"{path}: not a {what} ({type(exc).__name__})")
    except OSError as exc:
        raise UserInputError(f"{path}: cannot read it ({exc.strerror or exc})")
    if not isinstance(obj, dict):
        raise UserInputError(f"{path}: not a {what} (expected a JSON object)")
    return obj
