"""Ports of Llama 3, Qwen, Mistral and Phi-3 that get one thing wrong: named by that check, confirmed by
counterfactual, and by no other."""

from __future__ import annotations

import pytest

from conftest import run_by_candidate


@pytest.mark.parametrize("model,mutant,dtype,code,where", [
    ("llama-3.1-8b", "Llama3RopeScalingMissing", "float32", "LD406", "L0.q"),
    pytest.param("qwen2.5-0.5b", "QkvBiasDropped", "float32", "LD507", "L0.q", marks=pytest.mark.slow),
    pytest.param("qwen3-0.6b", "QkNormMissing", "float32", "LD207", "L0.q", marks=pytest.mark.slow),
    pytest.param("qwen2.5-0.5b", "NormEps1e5", "float32", "LD208", "L0.attn_norm", marks=pytest.mark.slow),
    pytest.param("mistral-7b-v0.1", "SlidingWindowIgnored", "float32", "LD508", "L0.attn_out",
                 marks=pytest.mark.slow),
    pytest.param("phi-3-mini-128k-instruct", "LongropeLongFactorsAlways", "float32", "LD407", "L0.q",
                 marks=pytest.mark.slow),
    pytest.param("phi-3-mini-4k-instruct", "SlidingWindowIgnored", "bfloat16", "LD508", "L0.attn_out",
                 marks=pytest.mark.slow),
    pytest.param("phi-3-mini-128k-instruct", "LongropeShortFactorsAlways", "bfloat16", "LD407", "L0.q",
                 marks=pytest.mark.slow),
    pytest.param("phi-3.5-mini-instruct", "LongropeAttentionFactorIgnored", "bfloat16", "LD408", "L0.q",
                 marks=pytest.mark.slow),
    pytest.param("qwen2.5-0.5b", "RopeThetaIgnored", "float32", "LD409", "L0.q", marks=pytest.mark.slow),
    pytest.param("qwen3-0.6b", "QkNormAfterRope", "float32", "LD209", "L0.q", marks=pytest.mark.slow),
    pytest.param("llama-3.1-8b", "TiedLmHead", "float32", "LD106", "logits", marks=pytest.mark.slow),
    pytest.param("qwen3-0.6b", "QkNormAcrossHeads", "float32", "LD210", "L0.q", marks=pytest.mark.slow),
    pytest.param("llama-3.1-8b", "RopeThetaIgnored", "bfloat16", "LD409", "L0.q", marks=pytest.mark.slow),
    pytest.param("llama-3.1-8b", "Llama3LinearScaling", "float32", "LD406", "L0.q", marks=pytest.mark.slow),
    pytest.param("qwen2.5-0.5b", "KvHeadsTiled", "float32", "LD506", "L0.attn_out", marks=pytest.mark.slow),
])
def test_a_port_bug_is_named_by_its_check_only(llmdiff_cli, mutants_on_path, model, mutant, dtype, code, where):
    impl = f"hf_mutants:{mutant}"
    rc, out, err, report = llmdiff_cli("compare", model, "--tiny", "--impl", impl, "--dtype", dtype)
    assert rc == 1, out + err
    run = run_by_candidate(report, impl, dtype)
    assert run["verdict"] == "divergence" and run["first_divergence"] == where
    (f,) = report["findings"]
    assert (f["code"], f["where"], f["confirmed"], f["implementation"]) == (code, where, True, impl)
    assert f["evidence"]["after"]["floor_ratio"] < f["evidence"]["before"]["floor_ratio"]


@pytest.mark.slow
def test_an_untied_head_where_qwen_ties_is_named_by_lm_head_untied_only(llmdiff_cli, mutants_on_path):
    """Qwen 2.5 0.5B ties its head: a port with a head of its own is LD105 (static evidence from
    the loaded model), and its logits divergence is not left unexplained."""
    impl = "hf_mutants:UntiedLmHead"
    rc, out, err, report = llmdiff_cli("compare", "qwen2.5-0.5b", "--tiny", "--impl", impl, "--dtype", "float32")
    assert rc == 1, out + err
    assert run_by_candidate(report, impl, "float32")["first_divergence"] == "logits"
    (f,) = report["findings"]
    assert (f["code"], f["where"], f["implementation"]) == ("LD105", "logits", impl)
    assert f["evidence"]["tied_lm_head"] is False
    # The static finding explains where it diverges: no counterfactual search there
    assert f"{impl} (float32): LD105 explains the divergence at logits" in out + err
    assert f"diagnosing {impl}" not in out + err


@pytest.mark.slow   # one compare with diagnosis (~45 s on 2 shared cores)
def test_a_window_the_config_switches_off_applied_anyway_is_ld510_only(llmdiff_cli, mutants_on_path):
    """Qwen 2.5's config.json carries `sliding_window` with `use_sliding_window: false` (the tiny
    model's: 32, shorter than its long prompt). A port that slides every layer by it anyway is
    LD510 alone, confirmed, diverging from the position equal to the window on."""
    from llmdiff.spec import get_spec

    window = get_spec("qwen2.5-0.5b", tiny=True).disabled_sliding_window
    impl = "hf_mutants:DisabledSlidingWindowApplied"
    rc, out, err, report = llmdiff_cli("compare", "qwen2.5-0.5b", "--tiny", "--impl", impl, "--dtype", "float32")
    assert rc == 1, out + err
    assert run_by_candidate(report, impl, "float32")["first_divergence"] == "L0.attn_out"
    (f,) = report["findings"]
    assert (f["code"], f["where"], f["confirmed"], f["implementation"]) == ("LD510", "L0.attn_out", True, impl)
    assert f["evidence"]["knob"] == {"disabled_window_applied": True}
    assert f["evidence"]["from_position"] == window == 32
    assert f["evidence"]["after"]["floor_ratio"] <= 8 < f["evidence"]["before"]["floor_ratio"]   # the floor factor


@pytest.mark.slow   # one compare with diagnosis (~40 s on 2 shared cores)
def test_llama_cpp_f16_gelu_table_is_ld302_only(llmdiff_cli, mutants_on_path):
    """Gemma's GeGLU with llama.cpp's CPU GELU (an F16 table at the F16 rounding of the input):
    LD302 alone, confirmed at L0.mlp_act. The table turns float32 noise into float16 steps, so
    the candidate is judged against the floor of the oracle with the knob on (~16x the clean one
    there: against the clean floor it stays ~20x, an LD000)."""
    impl = "hf_mutants:GeluF16Table"
    rc, out, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--impl", impl, "--dtype", "float32")
    assert rc == 1, out + err
    assert run_by_candidate(report, impl, "float32")["first_divergence"] == "L0.mlp_act"
    (f,) = report["findings"]
    assert (f["code"], f["where"], f["confirmed"]) == ("LD302", "L0.mlp_act", True)
    assert f["evidence"]["knob"] == {"gelu": "f16_table"}
    assert "together_with" not in f["evidence"]
    ev = f["evidence"]
    assert ev["after"]["floor_ratio"] <= 8 < ev["before"]["floor_ratio"]
    assert ev["hypothesis_floor"] > 8 * ev["noise_floor"]   # the knob-on oracle's own floor, far above the clean one
    assert ev["divergent_points"]["after"] == 0


@pytest.mark.slow   # one compare with diagnosis (~65 s on 2 shared cores)
def test_kv_rounded_to_f16_is_ld511_only(llmdiff_cli, mutants_on_path):
    """K and V rounded to float16 before attention in a float32 model (a float16 KV cache):
    LD511 alone, confirmed at L0.attn_out with the plain knob (q, k and v as captured agree).
    The rounding turns float32 noise into float16 steps, so the candidate is judged against
    the floor of the oracle with the knob on (~54x the clean one there: against the clean floor
    it stays ~45x, an LD000)."""
    impl = "hf_mutants:KvRoundedToF16"
    rc, out, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--impl", impl, "--dtype", "float32")
    assert rc == 1, out + err
    assert run_by_candidate(report, impl, "float32")["first_divergence"] == "L0.attn_out"
    (f,) = report["findings"]
    assert (f["code"], f["where"], f["confirmed"]) == ("LD511", "L0.attn_out", True)
    ev = f["evidence"]
    assert ev["knob"] == {"kv_f16": True}
    assert ev["after"]["floor_ratio"] <= 1 < 100 < ev["before"]["floor_ratio"]
    assert ev["hypothesis_floor"] > 8 * ev["noise_floor"]
    assert ev["divergent_points"]["after"] == 0


@pytest.mark.slow   # ~40 oracle runs
def test_two_bugs_at_one_point_are_named_together(tmp_path):
    """RoPE's interleaved layout and its angles in bfloat16 both act at L0.q and neither knob
    alone brings it back: the two are tried together (one of them alone comes nearer) and both
    named, each with the other in `together_with`."""
    from llmdiff import diagnose, diff, inputs, registry, weights
    from llmdiff.job import Job, WeightsSource
    from llmdiff.selftest import selftest_lengths
    from llmdiff.spec import capture_points, get_spec

    spec = get_spec("llama-3.1-8b", tiny=True)
    canonical = tmp_path / "w.safetensors"
    weights.save_canonical(canonical, weights.random_weights(spec, 0))
    job = Job(spec=spec.to_dict(), tokens=inputs.synthetic_prompts(spec, 0, selftest_lengths(spec)),
              weights=WeightsSource(canonical=str(canonical)))
    lab = diagnose.OracleLab(job, tmp_path)
    checks = [c for c in registry.load_checks()[0] if c.knob and c.applies(spec)]
    bug, points = {"rope_layout": "interleaved", "rope_dtype": "compute"}, capture_points(spec)
    clean, truth, caps = (lab.captures(d, [p], constants_dtype=c)[0] for d, p, c in
                          (("bfloat16", {}, None), ("float64", {}, "bfloat16"), ("bfloat16", bug, None)))
    floors = diff.noise_floors(clean, truth, "bfloat16")
    run = dict(diff.compare_captures(caps, clean, floors, "bfloat16", points), dtype="bfloat16")
    path = lab.path(diagnose.Variant.of("bfloat16", bug))
    found = diagnose.explain(diagnose.Case(lab, spec, "m", caps, path, floors, points), checks, run)
    assert sorted((f.code, f.where) for f in found) == [("LD401", "L0.q"), ("LD405", "L0.q")]
    assert all(f.confirmed and f.evidence["knob"] == bug for f in found)
    assert {tuple(f.evidence["together_with"]) for f in found} == {("LD401",), ("LD405",)}
