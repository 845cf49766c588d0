"""The checks registry: every built-in check honours the contract; plugins load like built-ins."""

from __future__ import annotations

import sys
import textwrap

import pytest

from llmdiff import registry
from llmdiff.check import Check, problems_with
from llmdiff.errors import UsageError


def test_every_builtin_check_is_documented_and_well_named():
    from llmdiff.references.gemma import Precision

    checks, broken = registry.load_checks()
    assert broken == []
    assert len(checks) >= 20  # the floor; every kind is represented
    assert {c.kind for c in checks} == {"static", "dynamic", "audit"}
    for c in checks:
        assert problems_with(type(c), Precision.knobs()) == [], c.code
    codes = [c.code for c in checks]
    names = [c.name for c in checks]
    assert len(set(codes)) == len(codes) and len(set(names)) == len(names)


def test_contract_violations_are_named():
    class Bad(Check):
        """## What it finds
        something
        """
        code = "X1"
        name = "use-better-code"
        knob = ("no_such_knob", 1)

    problems = " | ".join(problems_with(Bad, {"gelu": "tanh"}))
    assert "code 'X1' is not LD followed by three digits" in problems
    assert "name 'use-better-code'" in problems
    assert "lacks a '## Why it matters' section" in problems
    assert "knob 'no_such_knob' is not a field" in problems


def test_select_and_ignore_by_code_name_or_prefix():
    checks, _ = registry.load_checks()
    assert [c.code for c in registry.select(checks, select=["LD3"])] == ["LD301", "LD302"]
    assert [c.code for c in registry.select(checks, select=["gelu-exact-vs-tanh", "LD101"])] == ["LD101", "LD301"]
    assert "LD301" not in [c.code for c in registry.select(checks, ignore=["LD301"])]
    with pytest.raises(UsageError, match="no check matches 'LD9'"):
        registry.select(checks, select=["LD9"])


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """A third-party distribution on sys.path registering two checks: one good, one broken."""
    (tmp_path / "acme_checks.py").write_text(textwrap.dedent('''
        from llmdiff.check import Check

        class LmHeadBias(Check):
            """## What it finds
            A bias on the output projection.
            ## Why it matters
            Gemma has none.
            ## How it is confirmed
            Static: the implementation says it has one.
            ## Fix
            Drop it.
            ## References
            Acme's notes.
            """
            code = "LD900"
            name = "lm-head-bias"

            def run(self, ctx):
                yield self.finding(ctx, "lm_head", "third-party check ran", {"seen": ctx.implementation})
    '''))
    dist = tmp_path / "acme_checks-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-checks\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[llmdiff.checks]\nLD900 = acme_checks:LmHeadBias\nLD901 = acme_checks:DoesNotExist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("acme_checks", None)


def test_third_party_check_is_listed_and_runs(plugin_dist):
    from llmdiff.spec import get_spec

    from llmdiff import diagnose

    checks, broken = registry.load_checks()
    assert "LD900" in [c.code for c in checks]
    assert len(broken) == 1 and "LD901 = acme_checks:DoesNotExist" in str(broken[0])
    assert "cannot import" in str(broken[0])
    found = diagnose.static_findings(checks, get_spec("gemma-7b", tiny=True), "hf", {}, None, None)
    assert [(f.code, f.message, f.evidence) for f in found if f.code == "LD900"] == [
        ("LD900", "third-party check ran", {"seen": "hf"})]


def test_checks_list_and_explain(llmdiff_cli, plugin_dist):
    code, out, err, _ = llmdiff_cli("checks", "list")
    assert code == 0
    assert "LD301  gelu-exact-vs-tanh" in out and "dynamic" in out
    assert "LD900  lm-head-bias" in out and "static" in out
    assert "check plugin 'LD901 = acme_checks:DoesNotExist' skipped" in err
    code, out, _, _ = llmdiff_cli("checks", "explain", "gelu-exact-vs-tanh")
    assert code == 0
    for heading in ("What it finds", "Why it matters", "How it is confirmed", "Fix", "References"):
        assert f"\n{heading}\n" in out
    code, _, err, _ = llmdiff_cli("checks", "explain", "LD999")
    assert code == 2 and "no check 'LD999'" in err
