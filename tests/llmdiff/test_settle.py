"""The exit code of a compare report is decided in one place (`report.exit_code`)."""

from __future__ import annotations

import pytest

from llmdiff.report import exit_code


def _report(**over):
    base = {"implementations": [{"name": "hf", "ok": True}], "runs": [{"verdict": "parity"}], "findings": []}
    return {**base, **over}


@pytest.mark.parametrize("report,code", [
    (_report(), 0),
    (_report(runs=[{"verdict": "divergence"}]), 1),
    (_report(findings=[{"code": "LD301"}]), 1),
    (_report(runs=[{"verdict": "error"}]), 2),
    (_report(implementations=[{"name": "hf", "ok": False}]), 2),
    (_report(errors=[{"stage": "tokenizer parity"}]), 2),
    (_report(errors=[{"stage": "diagnosis"}], incomplete="interrupted"), 130),
    (_report(runs=[{"verdict": "divergence"}], baseline={"regressions": []}), 0),
    (_report(baseline={"regressions": [{"kind": "finding"}]}), 1),
    (_report(runs=[{"verdict": "error"}], baseline={"regressions": []}), 2),
])
def test_exit_code(report, code):
    assert exit_code(report) == code
