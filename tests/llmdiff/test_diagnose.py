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
