"""Shared helpers: run the CLI in-process (workers are subprocesses anyway), find mutants."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmdiff.cli import main

MUTANTS_DIR = Path(__file__).parent / "references"


def pytest_collection_modifyitems(config, items):
    """The selftests first: CI hands the slow cases out a file to a process in this order
    (.ci/run: `--dist loadfile --no-loadscope-reorder`), and theirs is the longest file, so it
    starts at once on a process of its own while the other takes every other file."""
    items.sort(key=lambda item: item.path.name != "test_selftest.py")


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
