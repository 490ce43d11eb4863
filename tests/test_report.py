"""HTML and Markdown reports: built from the certificate dict alone, self-contained, escaped."""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lipverify.report.html import fmt_num, fmt_pct, render_html, write_html
from lipverify.report.markdown import render_markdown, write_markdown

MINIMAL = {
    "schema_version": "1.0",
    "model": {"path": "m.onnx", "sha256": "ab" * 32, "format": "onnx", "input_shape": [1, 28, 28]},
    "certified_bound": 12.3,
    "lower_bound": 4.5,
    "ratio": 0.366,
    "bounds": {"product": 12.3},
}

FULL = {
    **MINIMAL,
    "method": "lipsdp-neuron",
    "output": None,
    "certified_bound": 8.123456789,
    "lower_bound": 4.567891234,
    "ratio": 4.567891234 / 8.123456789,
    "bounds": {"product": 12.3, "lipsdp-neuron": 8.123456789, "brand-new-method": 9.87},
    "layers": [
        {"name": "conv1", "op": "Conv", "in_shape": [1, 28, 28], "out_shape": [16, 14, 14],
         "factor": 3.2, "tau": 3.2, "lower": 3.1, "how": "FFT symbol bound"},
        {"name": "relu1", "op": "ReLU", "in_shape": [16, 14, 14], "out_shape": [16, 14, 14],
         "factor": 1.0, "lower": 1.0, "how": "slope [0, 1]"},
        {"name": "flatten", "op": "Reshape", "in_shape": [16, 14, 14], "out_shape": [3136], "how": "isometry"},
        {"name": "fc|out", "op": "Dense", "in_shape": [3136], "out_shape": [10],
         "factor": 3.84, "lower": 3.8, "how": "exact SVD"},
    ],
    "verification": {"product": "exact SVDs", "lipsdp-neuron": "Cholesky of the LMI: positive definite"},
    "device": "cpu",
    "timings": {"total_s": 3.5, "bounds_s": 0.02},
    "versions": {"lipverify": "0.1.0", "torch": "2.13.0"},
    "gates": [{"name": "max-L", "threshold": 10, "value": 8.123456789, "passed": True},
              {"name": "min-cert-acc@0.1", "threshold": 0.9, "value": 0.8, "passed": False}],
    "data": {"path": "test.npz", "n": 1000, "clean_accuracy": 0.981, "certified_accuracy": {"0.1": 0.8, "0.5": 0.31},
             "radius_quantiles": {"q10": 0.01, "q25": 0.1, "median": 0.3, "q75": 0.5, "q90": 0.7},
             "n_ties": 1, "n_misclassified": 18, "form": "pairwise",
             "curve": {"radius": [0.0, 0.1, 0.5, 0.9], "certified_accuracy": [0.981, 0.8, 0.31, 0.0]}},
    "a_future_key": {"nested": [1, 2, 3]},
}


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.extend(attrs)

    def handle_data(self, data):
        self.text.append(data)


def _parse(text: str) -> _Collector:
    p = _Collector()
    p.feed(text)
    p.close()
    return p


def _assert_self_contained(text: str, parsed: _Collector):
    for tag in ("script", "link", "img", "iframe", "object", "embed"):
        assert tag not in parsed.tags, tag
    for name, value in parsed.attrs:
        if name in ("src", "href", "xlink:href", "action"):
            assert value is None or value.startswith("#"), (name, value)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", text, re.I)
    assert not re.search(r"url\(\s*['\"]?(?!#)", text)  # only in-document references (SVG clip paths)
    assert "@import" not in text


def test_full_html_is_one_self_contained_file(tmp_path):
    out = tmp_path / "report.html"
    write_html(FULL, out)
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    text = out.read_text(encoding="utf-8")
    parsed = _parse(text)
    _assert_self_contained(text, parsed)
    assert parsed.tags.count("svg") == 3  # bounds, per-layer factors, accuracy-vs-radius
    assert parsed.tags.count("table") >= 7
    body = " ".join(parsed.text)
    for needle in ["m.onnx", "ab" * 32, "1×28×28", "lipsdp-neuron", "brand-new-method", "conv1",
                   "Certified accuracy vs radius", "80.00%", "31.00%", "max-L", "PASS", "FAIL",
                   "2.13.0", "FFT symbol bound", "a_future_key"]:
        assert needle in body or needle in text, needle


def test_certified_numbers_round_toward_safety():
    assert fmt_num(8.123456789, "up") == "8.12346"
    assert fmt_num(8.123454321, "up") == "8.12346"  # nearest would give 8.12345
    assert fmt_num(4.567891234, "down") == "4.56789"
    assert fmt_num(4.567899999, "down") == "4.56789"  # nearest would give 4.5679
    assert fmt_num(1.5, "up") == "1.5" and fmt_num(0.0, "down") == "0"
    assert fmt_num(1234567890.0, "up") == "1.23457e+09"
    assert fmt_num(None) == "—" and fmt_num(float("inf")) == "∞"
    assert fmt_pct(0.83679) == "83.67%" and fmt_pct(0.8) == "80.00%"
    cert = copy.deepcopy(FULL)
    cert["bounds"]["lipsdp-neuron"] = cert["certified_bound"] = 8.123454321
    assert "8.12346" in render_html(cert) and "8.12346" in render_markdown(cert)


def test_strings_are_escaped():
    cert = copy.deepcopy(FULL)
    cert["model"]["path"] = '<script>alert("x")</script>.onnx'
    cert["bounds"]['<img src="http://evil/x">'] = 20.0
    cert["layers"][0]["name"] = "</table><blink>boom"
    text = render_html(cert)
    parsed = _parse(text)
    assert "script" not in parsed.tags and "img" not in parsed.tags and "blink" not in parsed.tags
    assert "&lt;script&gt;" in text
    _assert_self_contained(text, parsed)
    md = render_markdown(cert)
    assert "<script>" not in md and "&lt;script&gt;" in md
    assert "<img" not in md


def test_minimal_certificate_renders(tmp_path):
    write_html(MINIMAL, tmp_path / "r.html")
    write_markdown(MINIMAL, tmp_path / "r.md")
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    parsed = _parse(text)
    _assert_self_contained(text, parsed)
    assert parsed.tags.count("svg") == 1  # only the bounds chart: no layers, no data
    assert "Certified radii" not in text and "no gates" in text
    md = (tmp_path / "r.md").read_text(encoding="utf-8")
    assert "| `product` **(reported)** | 12.3 |" not in md  # method key absent: nothing marked
    assert "| `product` | 12.3 | 0.365 | — |" in md  # tightness 0.3658 rounds down


def test_broken_optional_values_do_not_crash():
    cert = copy.deepcopy(FULL)
    cert["layers"] = [{"name": "x"}, "not a dict", {"factor": "n/a", "lower": None}]
    cert["data"] = {"curve": {"radius": [0, None], "certified_accuracy": [1.0]}}
    cert["gates"] = [{"name": "g"}]
    cert["timings"] = {"total_s": "fast"}
    cert["bounds"]["weird"] = None
    assert "<svg" in render_html(cert)
    assert "| weird |" in render_markdown(cert).replace("`", "")


def test_markdown_tables():
    md = render_markdown(FULL)
    assert "**Certified L2 Lipschitz bound: 8.12346**" in md
    assert "| method | certified upper bound | lower / certified | verification |" in md
    assert "| `lipsdp-neuron` **(reported)** | 8.12346 | 0.562 | Cholesky of the LMI: positive definite |" in md
    assert "| `brand-new-method` | 9.87 |" in md
    assert "| ε (L2) | certified accuracy (pairwise radii) |" in md and "| 0.5 | 31.00% |" in md
    assert "| `max-L` | 8.124 ≤ 10 | ✅ pass |" in md  # the value rounds up (an upper bound)
    assert "| `min-cert-acc@0.1` | 0.8 &lt; 0.9 | ❌ fail |" in md  # escaped like all cell text
    assert "`fc\\|out`" in md  # a pipe in a name does not break the row
    for line in md.splitlines():
        if line.startswith("|"):
            assert line.endswith("|")
    header_cols = {}
    for block in md.split("\n\n"):
        rows = [r for r in block.splitlines() if r.startswith("|")]
        if rows:
            widths = {len(re.split(r"(?<!\\)\|", r)) for r in rows}
            header_cols[rows[0]] = widths
            assert len(widths) == 1, rows  # every row of a table has the same number of cells


def test_soundness_alarm_is_shown():
    cert = copy.deepcopy(MINIMAL)
    cert["lower_bound"] = 13.0
    assert "soundness bug" in render_html(cert)
    assert "soundness bug" in render_markdown(cert)
    assert "soundness bug" not in render_html(MINIMAL)


def _load_screenshot_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.py"
    spec = importlib.util.spec_from_file_location("screenshot_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(
    not any(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")),
    reason="no headless Chromium on this machine",
)
def test_report_renders_in_a_browser(tmp_path):
    mod = _load_screenshot_script()
    write_html(FULL, tmp_path / "r.html")
    png = tmp_path / "r.png"
    mod.screenshot(tmp_path / "r.html", png, 1000, 1400)
    ok, n_colors, nonwhite = mod.blank_check(png)
    assert ok, (n_colors, nonwhite)
    # a blank page is recognised as blank
    (tmp_path / "blank.html").write_text("<html><body></body></html>")
    mod.screenshot(tmp_path / "blank.html", tmp_path / "b.png", 400, 300)
    assert not mod.blank_check(tmp_path / "b.png")[0]
