"""`llmdiff matrix` and `bisect`: releases, their virtualenvs, the search."""

from __future__ import annotations

import json

import pytest

from llmdiff import releases
from llmdiff.errors import UsageError

VERSIONS = ["1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0", "1.5.0", "1.6.0", "1.7.0"]


def _cell(release, bad=False, error=None, finding=None):
    if error:
        return releases.Cell(release, error=error)
    return releases.Cell(release, runs=[{"dtype": "float32", "verdict": "divergence" if bad else "parity",
                                         "first_divergence": "L0.mlp_act" if bad else None,
                                         "findings": [finding] if bad and finding else []}])


def test_bisect_finds_the_first_bad_release_in_few_runs():
    asked = []

    def evaluate(r):
        asked.append(r)
        return _cell(r, bad=r >= "1.5.0")

    result = releases.bisect(VERSIONS, evaluate)
    assert result["first_bad"] == "1.5.0" and result["before"] == "1.4.0"
    assert "1.5.0 broke it" in result["result"]
    assert len(asked) <= 2 + 3  # both ends, then log2(8)


def test_bisect_finds_a_fix_and_skips_releases_that_cannot_run():
    def evaluate(r):
        if r == "1.3.0":
            return _cell(r, error="cannot install transformers==1.3.0: no wheel")
        return _cell(r, bad=r < "1.4.0", finding="LD301")

    result = releases.bisect(VERSIONS, evaluate, finding="LD301")
    assert result["first_good"] == "1.4.0" and "fixed it" in result["result"]


def test_bisect_says_when_nothing_changes_and_when_an_end_cannot_run():
    assert releases.bisect(VERSIONS, lambda r: _cell(r))["first_bad"] is None
    with pytest.raises(UsageError, match="1.0.0 could not run: boom"):
        releases.bisect(VERSIONS, lambda r: _cell(r, error="boom") if r == "1.0.0" else _cell(r))


def test_releases_parse_pin_and_order():
    assert str(releases.Release.parse("Transformers == 4.42.1")) == "transformers==4.42.1"
    with pytest.raises(UsageError, match="expected PACKAGE==VERSION"):
        releases.Release.parse("transformers>=4.4")
    assert releases.Release.parse("transformers==4.42.1").pins() == ("numpy<2",)
    assert releases.Release.parse("transformers==5.0.0").pins() == ()
    assert releases.between("x", "1.6.0", "1.2.0", VERSIONS) == VERSIONS[2:7]
    with pytest.raises(UsageError, match="x==1.9.0 is not a release"):
        releases.between("x", "1.0.0", "1.9.0", VERSIONS)


def test_a_range_resolves_to_the_newest_patch_of_each_minor():
    index = ["4.44.0", "4.44.2", "4.45.0", "4.45.1", "4.46.0", "5.0.0"]
    got = releases.resolve("transformers>=4.44,<4.46", versions=index)
    assert [str(r) for r in got] == ["transformers==4.44.2", "transformers==4.45.1"]
    assert len(releases.resolve("transformers>=4.44,<4.46", every=True, versions=index)) == 4
    assert [r.version for r in releases.resolve("transformers==4.44.0,transformers==5.0.0")] == ["4.44.0", "5.0.0"]
    with pytest.raises(UsageError, match="no release of transformers on the index is in"):
        releases.resolve("transformers>=9", versions=index)
    with pytest.raises(UsageError, match="expected PKG==V"):
        releases.resolve("trans formers!!", versions=index)


def test_the_table_says_why_a_release_could_not_run():
    lines = releases.matrix_lines([_cell("t==1"), _cell("t==2", bad=True, finding="LD301"),
                                   _cell("t==3", error="cannot install t==3: no wheel")])
    assert lines[2] == "| t==1 | parity |"
    assert lines[3] == "| t==2 | divergence at L0.mlp_act (LD301) |"
    assert lines[4] == "| t==3 | error: cannot install t==3: no wheel |"


@pytest.mark.slow
def test_bisect_over_fake_releases_runs_real_compares(mutants_on_path):
    """Fake 'releases' switch a bug on from 1.5.0 (an HF mutant with exact GELU); the search runs
    the real comparison on each release it visits and names the finding's first release."""
    def evaluate(r):
        impl = "hf_mutants:ExactGelu" if r >= "1.5.0" else "hf"
        return releases.run_release("gemma-7b", "hf", None, implementation=impl, tiny=True,
                                    dtypes=["float32"], diagnose=True)

    result = releases.bisect(VERSIONS, evaluate, finding="LD301")
    assert result["first_bad"] == "1.5.0" and result["before"] == "1.4.0"
    assert result["cells"]["1.5.0"]["runs"][0]["findings"] == ["LD301"]


@pytest.mark.slow
def test_matrix_over_two_real_transformers_releases(tmp_path, monkeypatch, llmdiff_cli):
    """Two releases from the package index, each in its own virtualenv (torch shared)."""
    monkeypatch.setenv("LLMDIFF_VENVS", str(tmp_path / "venvs"))
    from click.testing import CliRunner

    from llmdiff.cli import main

    out = tmp_path / "m"
    result = CliRunner().invoke(main, ["matrix", "gemma-7b", "--tiny", "--dtype", "float32", "--no-diagnose",
                                       "--versions", "transformers==4.57.6,transformers==5.0.0", "--out", str(out)])
    report = json.loads((out / "matrix.json").read_text())
    assert "transformers==5.0.0" in (out / "matrix.html").read_text() and (out / "matrix.md").is_file()
    # Each release's own tokenizer was compared (parity ran under its interpreter).
    assert [c["tokenizer"]["version"] for c in report["releases"]] == ["4.57.6", "5.0.0"]
    assert all(c["tokenizer"]["agree"] and not c["tokenizer"]["findings"] for c in report["releases"])
    assert result.exit_code == report["exit_code"] != 2, result.output
    assert [c["versions"]["transformers"] for c in report["releases"]] == ["4.57.6", "5.0.0"]
    # gemma-7b's published config says hidden_act "gelu": both releases build the MLP from
    # ACT2FN[config.hidden_act] with no remap (the remap to tanh came later in 5.x), so exact GELU.
    assert all(c["runs"][0]["verdict"] == "divergence" and c["runs"][0]["first_divergence"] == "L0.mlp_act"
               for c in report["releases"])
    assert "| transformers==4.57.6 | divergence at L0.mlp_act | agree |" in result.output
    assert all(c["error"] is None for c in report["releases"])


def test_the_table_has_a_tokenizer_column_and_an_html_form():
    ok = releases.Cell("t==1", runs=[{"dtype": "float32", "verdict": "parity", "first_divergence": None,
                                      "findings": []}],
                       tokenizer={"agree": True, "error": None, "version": "1", "findings": []})
    bad = releases.Cell("t==2", runs=ok.runs, tokenizer={"agree": False, "error": None, "version": "2",
                                                         "findings": ["LD001"]})
    lines = releases.matrix_lines([ok, bad])
    assert lines[0] == "| release | float32 | tokenizer |"
    assert lines[3] == "| t==2 | parity | differ (LD001) |"
    assert releases.is_bad(bad, None) and releases.is_bad(bad, "LD001") and not releases.is_bad(ok, None)
    page = releases.matrix_html("gemma-7b", "hf", [ok, bad])
    assert '<td class="ok">parity</td>' in page and '<td class="bad">differ (LD001)</td>' in page


def test_matrix_and_bisect_hand_grad_to_every_release(monkeypatch):
    """`--grad` reaches each release's compare (the Trainer's normalisation fixed in 4.46 is a
    training bug: only a --grad compare sees it)."""
    from click.testing import CliRunner

    from llmdiff.cli import main

    seen = []

    def run_release(model, impl, release, say=lambda m: None, **options):
        seen.append((str(release), options["grad"]))
        return _cell(str(release), bad=str(release) < "t==1.5.0", finding="LD602")

    monkeypatch.setattr(releases, "run_release", run_release)
    monkeypatch.setattr(releases, "between", lambda package, a, b: VERSIONS)
    result = CliRunner().invoke(main, ["bisect", "gemma-7b", "--tiny", "--grad", "--good", "t==1.7.0",
                                       "--bad", "t==1.0.0", "--finding", "LD602"])
    assert result.exit_code == 0, result.output
    assert seen and all(grad for _, grad in seen)
    assert "t==1.5.0" in result.output
    monkeypatch.setattr(releases, "resolve", lambda versions, every=False: [releases.Release.parse("t==1.0.0")])
    seen.clear()
    result = CliRunner().invoke(main, ["matrix", "gemma-7b", "--tiny", "--versions", "t==1.0.0"])
    assert seen == [("t==1.0.0", False)] and "LD602" in result.output
