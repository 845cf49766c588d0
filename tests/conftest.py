"""Shared helpers: run the CLI in-process (workers are subprocesses anyway), find mutants."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmdiff.cli import main

MUTANTS_DIR = Path(__file__).parent / "references"


# The selftests first, in an order measured in CI (`.ci/run` on de7dbb1, bench/RESULTS.md:
# gemma-3-1b 606 s, llama 191, the Gemma 1 matrix 150, qwen2.5 121, qwen3 106, phi-3 100,
# autocast 67, gemma-2-2b 46 and mistral 40 with test_selftest.py's cuts). CI's slow step hands
# its two processes the cases in collection order (.ci/run: `--dist load --maxschedchunk 1`), the
# first two to one process, the next two to the other, then one at a time to whichever is free,
# each keeping one queued; so the two longest (Gemma 3's and Llama's) start at once, one on each
# process, and the shorter ones fill in.
SELFTEST_ORDER = ["gemma-3-1b", "qwen2.5-0.5b", "llama-3.1-8b", "test_selftest_matrix_is_diagonal", "qwen3-0.6b",
                  "phi-3-mini-128k-instruct", "test_selftest_is_diagonal_under_autocast", "gemma-2-2b",
                  "mistral-7b-v0.1"]


def _selftest_rank(item) -> int:
    if item.path.name != "test_selftest.py":
        return len(SELFTEST_ORDER) + 1
    key = item.callspec.params["model"] if hasattr(item, "callspec") else item.originalname
    return SELFTEST_ORDER.index(key) if key in SELFTEST_ORDER else len(SELFTEST_ORDER)


def pytest_collection_modifyitems(config, items):
    """The selftests first, in `SELFTEST_ORDER` (a stable sort: every other case keeps its order)."""
    items.sort(key=_selftest_rank)


def pytest_configure(config):
    global _config
    _config = config


_config = None


def pytest_runtest_logreport(report):
    """Each case of 20 s or more as it ends, with its time: CI's log then tells where the time
    went even when the run is stopped before `--durations` prints (under xdist too: the
    controller sees every process's reports)."""
    terminal = _config and _config.pluginmanager.get_plugin("terminalreporter")
    if report.when == "call" and report.duration >= 20 and terminal:
        terminal.ensure_newline()
        terminal.write_line(f"[{report.duration:5.0f} s] {report.nodeid} {report.outcome}")


@pytest.fixture
def mutants_on_path(monkeypatch):
    """Make tests/references/hf_mutants.py importable by worker processes."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(MUTANTS_DIR), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture
def llmdiff_cli(tmp_path):
    """Run `llmdiff ARGS...`; returns (exit code, stdout, stderr, JSON report or None)."""

    def run(*args):
        report_path = tmp_path / f"report-{len(list(tmp_path.glob('report-*.json')))}.json"
        cmd = list(args)
        if args and args[0] == "compare":
            cmd += ["--json", str(report_path)]
        result = CliRunner().invoke(main, cmd, catch_exceptions=False)
        report = json.loads(report_path.read_text()) if report_path.exists() else None
        return result.exit_code, result.stdout, result.stderr, report

    return run


def run_by_candidate(report, candidate, dtype):
    return next(r for r in report["runs"] if r["candidate"] == candidate and r["dtype"] == dtype)
