"""The selftest: every dynamic check's bug as an oracle mutant, named by that check and no other.

The slowest cases of the suite (hundreds of oracle runs each): CI runs this file first, on a
process of its own (`--dist loadfile`), so no two selftests write their GBs of runs at once."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow   # ~400 oracle runs; the families' selftests are slow too
def test_selftest_matrix_is_diagonal(llmdiff_cli, tmp_path):
    """Every dynamic check that applies to Gemma 1 names its own bug and no other, both dtypes."""
    code, out, _, _ = llmdiff_cli("selftest", "--model", "gemma-7b", "--json", str(tmp_path / "selftest.json"))
    result = json.loads((tmp_path / "selftest.json").read_text())
    assert code == 0 and result["diagonal"], out
    rows = {(r["dtype"], r["mutant"]): r for r in result["rows"]}
    assert rows[("float32", "clean")]["found"] == [] and rows[("bfloat16", "clean")]["found"] == []
    assert rows[("bfloat16", "LD201")]["found"] == ["LD201"]  # bf16-only, seen teacher-forced
    assert ("float32", "LD201") not in rows  # not a float32 bug
    assert rows[("float32", "unknown")]["found"] == ["LD000"] and "L0.attn_out" in rows[("float32", "unknown")]["where"]
    triples = [r for r in result["rows"] if r["mutant"].count("+") == 2]
    assert len(triples) == 2 and all(len(r["found"]) == 3 for r in triples)


def test_selftest_mutant_no_row_can_have_is_one_error_before_any_run(llmdiff_cli):
    code, out, err, _ = llmdiff_cli("selftest", "--model", "gemma-3-1b", "--mutant", "LD202+LD999")
    assert code == 2 and "Traceback" not in out + err, out + err
    assert "selftest gemma-3-1b has no mutant 'LD202+LD999'" in err and "LD207" in err


@pytest.mark.slow   # ~2.5 min
def test_selftest_is_diagonal_under_autocast(llmdiff_cli, tmp_path):
    """Mixed precision: an autocast-only bug (RoPE angles in the low dtype) named there, the
    kernel-rounding checks of llama.cpp (LD302, LD511) not tried (no float32 value to round),
    an unknown bug unexplained and not given a false name."""
    code, out, _, _ = llmdiff_cli("selftest", "--model", "gemma-7b", "--dtype", "autocast-bfloat16",
                                  "--json", str(tmp_path / "selftest.json"))
    result = json.loads((tmp_path / "selftest.json").read_text())
    assert code == 0 and result["diagonal"], out
    rows = {r["mutant"]: r for r in result["rows"]}
    assert rows["LD401"]["found"] == ["LD401"] and rows["unknown"]["found"] == ["LD000"]
    assert "LD302" not in rows and "LD511" not in rows   # no mutant of theirs: they cannot act here


@pytest.mark.slow   # 1.5-7 min each here: gemma-2-2b's is the longest (1560 oracle runs)
# One model per family; Phi-3's is the 128k one (LongRoPE): the 4k one's window checks are
# Mistral's here, and its window bug a port mutant above (CI's 90 minutes).
@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen2.5-0.5b", "qwen3-0.6b", "mistral-7b-v0.1",
                                   "phi-3-mini-128k-instruct", "gemma-2-2b", "gemma-3-1b"])
def test_selftest_is_diagonal_for_each_family(llmdiff_cli, model):
    """Every dynamic check's bug as an oracle mutant, three at once, and a bug no check knows;
    on Gemma 2/3 (local and global layers) a bug on global layers only and two bugs each on its
    own kind: each named by its own check only."""
    rc, out, err, _ = llmdiff_cli("selftest", "--model", model)
    assert rc == 0, out + err
    assert "diagonal" in out and "NOT diagonal" not in out
