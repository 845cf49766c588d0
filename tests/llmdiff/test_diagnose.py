"""HF mutants are named by the right check, confirmed by counterfactual on the oracle."""

from __future__ import annotations

from conftest import run_by_candidate


def _findings(report, code):
    return [f for f in report["findings"] if f["code"] == code]


def test_exact_gelu_is_named_and_confirmed(llmdiff_cli, mutants_on_path):
    code, out, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--impl", "hf_mutants:ExactGelu",
                                       "--dtype", "float32")
    assert code == 1
    run = run_by_candidate(report, "hf_mutants:ExactGelu", "float32")
    assert run["verdict"] == "divergence"
    assert run["first_divergence"] == "L0.mlp_act"  # gate and up are still right; act(gate)*up is not
    assert "first divergence at L0.mlp_act" in out
    (f,) = report["findings"]
    assert (f["code"], f["name"], f["where"], f["confirmed"]) == ("LD301", "gelu-exact-vs-tanh", "L0.mlp_act", True)
    ev = f["evidence"]
    assert ev["knob"] == {"gelu": "exact"}
    assert ev["before"]["floor_ratio"] > 50 and ev["after"]["floor_ratio"] < 8  # collapses to the floor
    assert ev["divergent_points"]["after"] == 0
    assert "gelu_pytorch_tanh" in f["fix"]
    assert "LD301 gelu-exact-vs-tanh" in out


def test_python_float_embed_scale_is_named_in_bf16_only(llmdiff_cli, mutants_on_path):
    code, _, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--impl", "hf_mutants:PythonFloatEmbedScale")
    assert code == 1
    assert run_by_candidate(report, "hf_mutants:PythonFloatEmbedScale", "float32")["verdict"] == "parity"
    bf16 = run_by_candidate(report, "hf_mutants:PythonFloatEmbedScale", "bfloat16")
    assert bf16["first_divergence"] == "embed"
    assert 1e-3 < bf16["points"][0]["rel_l2"] < 1e-2  # 27.75 vs 27.7128-ish: a few parts in a thousand
    (f,) = report["findings"]
    assert (f["code"], f["dtype"], f["where"], f["confirmed"]) == ("LD101", "bfloat16", "embed", True)
    assert f["evidence"]["after"]["rel_l2"] == 0  # the oracle with the bug is bit-identical


def test_clean_hf_has_no_findings_and_ignore_works(llmdiff_cli, mutants_on_path):
    code, _, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--dtype", "float32")
    assert code == 0 and report["findings"] == []
    code, _, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--impl", "hf_mutants:ExactGelu",
                                     "--dtype", "float32", "--ignore", "LD3")
    assert code == 1
    (f,) = report["findings"]
    assert f["code"] == "LD000" and f["where"] == "L0.mlp_act"  # without LD301 it is unexplained
    assert "unexplained divergence starting at L0.mlp_act" in f["message"]


def test_norm_without_plus_one_and_untied_lm_head(llmdiff_cli, mutants_on_path):
    """Two headline bugs in one run: a Llama RMSNorm on Gemma weights, an untied output projection."""
    code, _, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--dtype", "float32",
                                     "--impl", "hf_mutants:NormWithoutPlusOne", "--impl", "hf_mutants:UntiedLmHead")
    assert code == 1
    by_impl = {}
    for f in report["findings"]:
        by_impl.setdefault(f["implementation"], []).append(f)
    (norm,) = by_impl["hf_mutants:NormWithoutPlusOne"]
    assert (norm["code"], norm["where"], norm["confirmed"]) == ("LD202", "L0.attn_norm", True)
    assert norm["evidence"]["after"]["floor_ratio"] < 8 < norm["evidence"]["before"]["floor_ratio"]
    (head,) = by_impl["hf_mutants:UntiedLmHead"]  # static evidence; its logits divergence is not "unexplained"
    assert (head["code"], head["where"]) == ("LD105", "logits")
    assert head["evidence"]["tied_lm_head"] is False and head["evidence"]["max_abs_diff"] > 0
    assert run_by_candidate(report, "hf_mutants:UntiedLmHead", "float32")["first_divergence"] == "logits"


def test_selftest_matrix_is_diagonal(llmdiff_cli, tmp_path):
    """Every dynamic check that applies to Gemma 1 names its own bug and no other, both dtypes."""
    import json

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


def test_rope_in_bfloat16_is_confirmed_teacher_forced(llmdiff_cli, mutants_on_path):
    """Below the accumulated bfloat16 noise free-running, yet confirmed where it acts."""
    code, _, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--dtype", "bfloat16",
                                     "--impl", "hf_mutants:RopeInBFloat16")
    assert code == 1
    run = run_by_candidate(report, "hf_mutants:RopeInBFloat16", "bfloat16")
    assert run["local_divergence"] == "L0.q"
    (f,) = report["findings"]
    assert (f["code"], f["where"], f["confirmed"]) == ("LD401", "L0.q", True)
    assert f["evidence"]["teacher_forced"] and f["evidence"]["after"]["rel_l2"] < f["evidence"]["before"]["rel_l2"] / 10
