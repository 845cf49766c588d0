"""The CI gate: a baseline report is checked before the run; regressions decide the exit code."""

from __future__ import annotations

import json

import pytest

from llmdiff import baseline
from llmdiff.errors import UsageError


def _report(rel_l2, verdict="divergence", findings=()):
    return {"implementations": [{"name": "hf", "ok": True}], "findings": list(findings),
            "runs": [{"candidate": "hf", "dtype": "bfloat16", "verdict": verdict,
                      "points": [{"name": "L0.q", "rel_l2": rel_l2, "verdict": verdict}]}]}


def test_growth_beyond_the_factor_is_a_regression(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(_report(0.01)))
    old = baseline.load(path)
    same = _report(0.015)
    baseline.apply(same, old, path, factor=2)
    assert same["baseline"]["regressions"] == [] and same["exit_code"] == 0  # known, not worse
    worse = _report(0.03)
    baseline.apply(worse, old, path, factor=2)
    assert [r["point"] for r in worse["baseline"]["regressions"]] == ["L0.q"] and worse["exit_code"] == 1


def test_a_new_finding_is_a_regression(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(_report(0.01)))
    f = {"code": "LD301", "name": "gelu", "implementation": "hf", "dtype": "bfloat16", "where": "L0.mlp_act"}
    now = _report(0.01, findings=[f])
    baseline.apply(now, baseline.load(path), path)
    assert now["baseline"]["regressions"][0]["kind"] == "finding" and now["exit_code"] == 1


@pytest.mark.parametrize("content,said", [
    (None, "does not exist"),
    ("{", "not valid JSON"),
    ("[]", "expected a JSON object"),
    ('{"runs": 3}', "not an llmdiff compare report"),
    ('{"runs": [{"candidate": "hf"}]}', "not of a compare report's shape"),
    ('{"runs": [], "findings": [{"code": "LD1"}]}', "a finding lacks"),
])
def test_a_bad_baseline_is_one_line(tmp_path, content, said):
    path = tmp_path / "b.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError) as e:
        baseline.load(path)
    assert said in str(e.value)
