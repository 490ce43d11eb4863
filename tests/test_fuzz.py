"""Fuzzed bad inputs: every case ends with exit 0/1/2 and a message, never a traceback or a hang.

The long run is ``benchmarks/fuzz_inputs.py --cases 1000``; here a seeded sample of the same
generator runs in a worker process with a per-case timeout, plus one regression test per bug the
fuzzer found. Bugs in files the fuzzing work may not edit are ``xfail(strict=True)`` with the fix
proposed in their reason: once fixed they XPASS, which fails, so the marker gets removed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import fuzz_inputs  # noqa: E402
from fuzz_inputs import FAST, FIXTURES, GOOD, Case, make_case, run_cases, summarize  # noqa: E402

from lipverify.cli import app  # noqa: E402

# Known bugs found by the fuzzer in files outside this work's scope: (file, function) of the last
# lipverify frame of the traceback -> the fix proposed to the lead. Remove an entry once fixed.
KNOWN_BUGS: dict[tuple[str, str], str] = {}  # all bugs found by the fuzzer so far are fixed


def known_bug(rec: dict) -> str | None:
    argv = rec.get("argv", [])
    if rec["outcome"] == "input-modified" and "--json" in argv and argv[argv.index("--json") + 1] == argv[1]:
        return "cli.py certify: refuse --json naming the model file"
    tb = rec.get("traceback") or ""
    frames = [l.strip() for l in tb.splitlines() if l.strip().startswith('File "') and "/lipverify/" in l]
    if not frames:
        return None
    last = frames[-1]
    for (file, fn), fix in KNOWN_BUGS.items():
        if f"lipverify/{file}" in last and (fn == "*" or last.endswith(f"in {fn}")):
            return fix
    return None


def test_generator_is_deterministic_and_covers_every_category():
    cats = set()
    for seed in range(200):
        a, b = make_case(seed), make_case(seed)
        assert a.argv == b.argv and a.files == b.files and a.what == b.what
        cats.add(a.category)
    assert cats == set(fuzz_inputs.CATEGORIES)


def test_seeded_sample_has_no_traceback_or_hang():
    """~45 random cases (every category) in a worker with a 60 s timeout per case."""
    seeds = list(range(50_000, 50_045))
    records = run_cases(seeds, timeout=60)
    s = summarize(records)
    assert s["cases"] == len(seeds)
    unexplained = [r for r in records if r["outcome"] not in GOOD and not known_bug(r)]
    assert not unexplained, "\n".join(
        f"{r['outcome']}: case {r['seed']} {r['category']} {r['what']}: lipverify {' '.join(r['argv'])}\n"
        f"{(r.get('traceback') or r.get('message') or '')[-800:]}" for r in unexplained)
    # most bad inputs are refused with exit 2 and a message
    assert s["outcomes"].get("exit2", 0) >= len(seeds) // 3


# -- regression cases ------------------------------------------------------------------------------


def _invoke(tmp_path: Path, case: Case):
    for name, data in case.files.items():
        (tmp_path / name).write_bytes(data)
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        return CliRunner().invoke(app, case.argv, catch_exceptions=True)
    finally:
        os.chdir(cwd)


def _assert_clean_exit2(result):
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), f"traceback: {exc!r}"
    assert result.exit_code == 2, (result.exit_code, result.output)
    out = result.output + (getattr(result, "stderr", "") or "")
    assert out.strip(), "exit 2 without a message"


def _onnx_with(edit) -> bytes:
    import onnx

    m = onnx.load(str(FIXTURES / "mlp.onnx"))
    edit(m)
    return m.SerializeToString()


def test_spec_not_utf8_is_refused(tmp_path):
    case = Case(0, "spec", "spec file not UTF-8", ["inspect", "m.safetensors", "--spec", "s.json"],
                {"m.safetensors": (FIXTURES / "mlp.safetensors").read_bytes(), "s.json": b"\xff\xfe{"})
    _assert_clean_exit2(_invoke(tmp_path, case))


def test_spec_nested_too_deep_is_refused(tmp_path):
    spec = json.loads((FIXTURES / "mlp.json").read_text())
    depth = 5000
    deep = '{"type": "residual", "layers": [' * depth + '{"type": "relu"}' + "]}" * depth
    text = json.dumps(dict(spec, layers=["@"])).replace('"@"', deep)
    case = Case(0, "spec", "residual nested 5000 deep", ["inspect", "m.safetensors", "--spec", "s.json"],
                {"m.safetensors": (FIXTURES / "mlp.safetensors").read_bytes(), "s.json": text.encode()})
    _assert_clean_exit2(_invoke(tmp_path, case))


def _dims(m):
    t = next(i for i in m.graph.initializer if i.name == "fc2.bias")
    t.dims[0] = 3


def _dtype(m):
    m.graph.initializer[0].data_type = 0


def _no_outputs(m):
    del m.graph.output[:]


def _huge_input(m):
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2**40


def _bug(reason):
    """A regression test for a bug the fuzzer found (fixed); ``reason`` records what it was."""
    return pytest.mark.regression


@pytest.mark.parametrize("edit", [
    pytest.param(_dims, marks=_bug("load/model.py check_finite_initializers: numpy_helper.to_array raises "
                                   "ValueError when an initializer's dims do not match its data")),
    pytest.param(_dtype, marks=_bug("load/model.py check_finite_initializers: TypeError for data_type 0")),
    pytest.param(_no_outputs, marks=_bug("graph/from_onnx.py extract: IndexError on a graph without outputs")),
    pytest.param(_huge_input, marks=_bug("graph/from_onnx.py OnnxExtractor.__init__: MemoryError allocating "
                                         "the probe for an input dim of 2**40")),
], ids=["initializer-dims", "initializer-dtype", "no-outputs", "huge-input-dim"])
def test_malformed_onnx_is_refused(tmp_path, edit):
    case = Case(0, "onnx_edit", edit.__name__, ["certify", "m.onnx", *FAST], {"m.onnx": _onnx_with(edit)})
    _assert_clean_exit2(_invoke(tmp_path, case))


@_bug("attack.py lower_bound: --lower-starts 0 raises IndexError (argmax of an empty tensor)")
def test_lower_starts_zero_is_refused(tmp_path):
    case = Case(0, "cli", "--lower-starts 0", ["certify", "m.onnx", "--method", "product", "--lower-starts", "0",
                                               "-q", "--device", "cpu"], {"m.onnx": (FIXTURES / "mlp.onnx").read_bytes()})
    _assert_clean_exit2(_invoke(tmp_path, case))


@_bug("radii.py write_csv: FileNotFoundError when the --per-sample folder does not exist")
def test_per_sample_in_missing_folder(tmp_path):
    case = Case(0, "cli", "--per-sample nodir/p.csv",
                ["certify", "m.onnx", *FAST, "--data", "d.npz", "--per-sample", "nodir/p.csv"],
                {"m.onnx": (FIXTURES / "mlp.onnx").read_bytes(), "d.npz": (FIXTURES / "digits_test.npz").read_bytes()})
    result = _invoke(tmp_path, case)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 2)


@_bug("fileio.py atomic_write_bytes: OSError (EBUSY) when --json names a directory")
def test_json_to_a_directory_is_refused(tmp_path):
    case = Case(0, "cli", "--json .", ["inspect", "m.onnx", "--json", "."],
                {"m.onnx": (FIXTURES / "mlp.onnx").read_bytes()})
    _assert_clean_exit2(_invoke(tmp_path, case))


@_bug("check.py read_certificate: TypeError when schema_version is a list")
def test_certificate_with_list_schema_version(tmp_path):
    case = Case(0, "check", "schema_version list", ["check", "c.json", "m.onnx"],
                {"c.json": b'{"schema_version": [1]}', "m.onnx": (FIXTURES / "mlp.onnx").read_bytes()})
    _assert_clean_exit2(_invoke(tmp_path, case))


@_bug("cli.py certify: --json naming the model file overwrites the model (data loss)")
def test_json_over_the_model_file_is_refused(tmp_path):
    model = (FIXTURES / "mlp.onnx").read_bytes()
    case = Case(0, "cli", "--json m.onnx", ["certify", "m.onnx", *FAST, "--json", "m.onnx"], {"m.onnx": model})
    result = _invoke(tmp_path, case)
    assert (tmp_path / "m.onnx").read_bytes() == model, "the model file was overwritten"
    _assert_clean_exit2(result)


def test_budget_mem_refuses_before_allocating(tmp_path):
    """--budget-mem (if this version has it): a budget far below the model's needs is exit 2."""
    from lipverify import cli

    if "budget_mem" not in cli.certify.__code__.co_varnames:
        pytest.skip("no --budget-mem in this version")
    case = Case(0, "cli", "--budget-mem 1K", ["certify", "m.onnx", *FAST, "--budget-mem", "1K"],
                {"m.onnx": (FIXTURES / "cnn_bn.onnx").read_bytes()})
    result = _invoke(tmp_path, case)
    _assert_clean_exit2(result)
    assert "budget" in (result.output + (getattr(result, "stderr", "") or "")).lower()
