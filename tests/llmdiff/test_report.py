"""Report files, re-comparison without models, baselines, configuration, determinism."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import MUTANTS_DIR
from llmdiff.cli import main


def cli(*args, cwd=None):
    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def gelu_run(tmp_path_factory):
    """One compare of the exact-GELU mutant (divergent in float32, parity in bfloat16), saved."""
    out = tmp_path_factory.mktemp("run") / "out"
    env = dict(os.environ, PYTHONPATH=str(MUTANTS_DIR))
    proc = subprocess.run(["llmdiff", "compare", "gemma-7b", "--tiny", "--impl", "hf", "--impl",
                           "hf_mutants:ExactGelu", "--out", str(out), "--save-captures", "-q"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return out


def test_all_four_files(gelu_run):
    report = json.loads((gelu_run / "report.json").read_text())
    for key in ("llmdiff_version", "model", "spec", "weights", "implementations", "runs", "findings", "exit_code"):
        assert key in report
    for run in report["runs"]:
        for key in ("dtype", "reference", "candidate", "verdict", "first_divergence", "points", "logits"):
            assert key in run
        for p in run["points"]:
            for key in ("name", "max_abs", "mean_abs", "rel_l2", "cosine", "noise_floor", "verdict"):
                assert key in p
    for f in report["findings"]:
        for key in ("code", "name", "implementation", "dtype", "where", "message", "evidence", "confirmed", "fix"):
            assert key in f

    suite = ET.parse(gelu_run / "junit.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    failed = {c.get("name") for c in cases if c.find("failure") is not None}
    divergent = {f"{r['candidate']} vs {r['reference']} [{r['dtype']}]" for r in report["runs"]
                 if r["verdict"] == "divergence"}
    assert divergent == {"hf_mutants:ExactGelu vs oracle [float32]"}
    finding_cases = {c.get("name") for c in cases if c.get("classname").startswith("llmdiff.findings")}
    assert len(finding_cases) == len(report["findings"]) == 1
    assert failed == divergent | finding_cases  # failures exactly for divergent runs and findings
    assert int(suite.get("tests")) == len(report["runs"]) + 1 and int(suite.get("failures")) == 2

    md = (gelu_run / "report.md").read_text()
    assert len(md.splitlines()) < 60
    assert "❌ divergence" in md and "L0.mlp_act" in md and "LD301" in md

    class Images(HTMLParser):
        images = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.images.append(dict(attrs)["src"])

    parser = Images()
    parser.feed((gelu_run / "report.html").read_text())
    # Per run its per-layer plot and its layer x position heat map; per confirmed finding its
    # before/after curves.
    confirmed = sum(1 for f in report["findings"] if f["confirmed"] and f["evidence"].get("curve"))
    assert confirmed >= 1 and len(parser.images) == 2 * len(report["runs"]) + confirmed
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_renders_in_a_real_browser(gelu_run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2400",
                    (gelu_run / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The page is not blank: a rendered report has many distinct colours (plots, table shading).
    from PIL import Image  # matplotlib depends on pillow

    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50


def test_report_recompares_without_running_a_model(gelu_run, monkeypatch):
    def no_models(*a, **k):
        raise AssertionError("a worker was started")

    monkeypatch.setattr("llmdiff.runner.Worker.__init__", no_models)   # every worker process starts there
    monkeypatch.setattr("subprocess.run", no_models)
    code, out, _ = cli("report", str(gelu_run), "-q")
    assert code == 1
    assert "hf vs oracle [bfloat16]: parity" in out
    code, out, _ = cli("report", str(gelu_run), "-q", "--floor-factor", "0.5")
    assert code == 1
    assert "hf vs oracle [bfloat16]: divergence" in out  # stricter: the same captures now diverge
    code, out, _ = cli("report", str(gelu_run), "-q", "--threshold", "L0.mlp_act=1000", "--threshold", "*=1000")
    assert "hf_mutants:ExactGelu vs oracle [float32]: parity" in out


def test_report_of_a_directory_without_captures(tmp_path):
    code, _, err = cli("report", str(tmp_path))
    assert code == 2 and "holds no report.json" in err


def test_baseline_gates_only_regressions(gelu_run, tmp_path):
    baseline = gelu_run / "report.json"
    # The same (divergent) captures against their own baseline: nothing grew, nothing new: exit 0.
    code, _, _ = cli("report", str(gelu_run), "-q", "--baseline", str(baseline), "--out", str(tmp_path / "a"))
    assert code == 0
    assert json.loads((tmp_path / "a" / "report.json").read_text())["baseline"]["regressions"] == []
    # A baseline where the mutant was clean: its divergence and its finding are regressions.
    clean = json.loads(baseline.read_text())
    clean["findings"] = []
    for run in clean["runs"]:
        for p in run["points"]:
            p["rel_l2"] = p["rel_l2"] / 100
    (tmp_path / "clean.json").write_text(json.dumps(clean))
    code, out, _ = cli("report", str(gelu_run), "--baseline", str(tmp_path / "clean.json"), "--out", str(tmp_path / "b"))
    assert code == 1
    kinds = {r["kind"] for r in json.loads((tmp_path / "b" / "report.json").read_text())["baseline"]["regressions"]}
    assert kinds == {"point", "finding"}
    code, _, err = cli("report", str(gelu_run), "--baseline", str(tmp_path / "missing.json"))
    assert code == 2 and "baseline" in err and "does not exist" in err


def test_configuration_and_bad_key(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.llmdiff]\ndtypes = ["float32"]\nfloor_factor = 9.0\n'
                                             '[tool.llmdiff.thresholds]\n"logits" = 12\n')
    code, out, _ = cli("compare", "gemma-7b", "--tiny", "-q", "--no-diagnose", "--json", str(tmp_path / "r.json"),
                       cwd=tmp_path)
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["options"]["dtypes"] == ["float32"] and report["options"]["thresholds"]["floor_factor"] == 9.0
    logits = report["runs"][0]["points"][-1]
    assert logits["name"] == "logits" and logits["threshold"] == 12
    (tmp_path / "llmdiff.toml").write_text('dtypes = ["float32"]\nimplementatons = ["hf"]\n')
    code, _, err = cli("compare", "gemma-7b", "--tiny", cwd=tmp_path)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "unknown key 'implementatons'; allowed keys: " in err and "implementations" in err


def test_same_seed_gives_byte_identical_report_apart_from_timings(tmp_path):
    texts = []
    for name in ("a", "b"):
        code, _, _ = cli("compare", "gemma-7b", "--tiny", "--dtype", "float32", "-q", "--out", str(tmp_path / name))
        assert code == 0
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report.pop("timings")["workers"]
        texts.append(json.dumps(report, sort_keys=True))
    assert texts[0] == texts[1]


def test_pytest_assert_shows_a_readable_summary():
    from llmdiff.api import CompareResult

    result = CompareResult({"model": "gemma-7b", "exit_code": 1, "implementations": [], "findings": [],
                            "runs": [{"candidate": "hf", "reference": "oracle", "dtype": "float32",
                                      "verdict": "divergence", "first_divergence": "L0.mlp_act"}]})
    assert not result
    assert "hf vs oracle [float32]: divergence first divergence at L0.mlp_act" in repr(result)
