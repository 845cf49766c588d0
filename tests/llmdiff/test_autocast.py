"""`--dtype autocast-bfloat16`: float32 weights under torch.autocast in HF, the oracle's
matching policy (matrix products in bfloat16, everything else in float32), its own floors."""

from __future__ import annotations

import pytest

from conftest import run_by_candidate


@pytest.mark.slow
def test_a_rope_table_made_under_autocast_is_named_there_only(llmdiff_cli, mutants_on_path):
    """RoPE's `inv_freq @ positions` left under autocast runs in bfloat16: the angles are off, more
    the later the position. Named (LD401) and confirmed in autocast-bfloat16; pure float32 and
    pure bfloat16 are at parity (there the product is float32)."""
    impl = "hf_mutants:RopeAnglesUnderAutocast"
    code, out, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--impl", impl,
                                       "--dtype", "float32", "--dtype", "bfloat16", "--dtype", "autocast-bfloat16",
                                       "--dtype", "autocast-float16")
    assert code == 1, out
    assert run_by_candidate(report, impl, "float32")["verdict"] == "parity"
    assert run_by_candidate(report, impl, "bfloat16")["verdict"] == "parity"
    for dtype in ("autocast-bfloat16", "autocast-float16"):   # float16's 11 bits: off from a later position
        mixed = run_by_candidate(report, impl, dtype)
        assert mixed["verdict"] == "divergence" and mixed["first_divergence"] == "L0.q"
    found = sorted((f["code"], f["dtype"], f["confirmed"]) for f in report["findings"])
    assert found == [("LD401", "autocast-bfloat16", True), ("LD401", "autocast-float16", True)]
    assert all(f["evidence"]["from_position"] > 0 for f in report["findings"])  # grows along the sequence


@pytest.mark.slow   # the default suite has autocast's mutant test; each family's clean run is here
@pytest.mark.parametrize("model", ["gemma-2-2b", "gemma-3-1b", "llama-3.2-1b", "qwen3-0.6b", "qwen2.5-0.5b"])
def test_clean_models_are_at_parity_under_autocast(llmdiff_cli, model):
    code, out, _, report = llmdiff_cli("compare", model, "--tiny", "--dtype", "autocast-bfloat16")
    assert code == 0, out
    run = run_by_candidate(report, "hf", "autocast-bfloat16")
    assert run["verdict"] == "parity" and report["findings"] == []
    # Mixed: the projections are bfloat16 (a floor of bfloat16's size), the embedding float32.
    floors = {p["name"]: p["noise_floor"] for p in run["points"]}
    assert floors["L0.v"] > 1e-4 and floors["embed"] < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma-7b", "llama-3.2-1b"])
def test_clean_models_are_at_parity_under_float16_autocast(llmdiff_cli, model):
    """float16 autocast (GPUs without bfloat16, `fp16=True` training): the projections in
    float16, whose floor is 8 times smaller than bfloat16's, the rest float32."""
    code, out, _, report = llmdiff_cli("compare", model, "--tiny", "--dtype", "autocast-float16")
    assert code == 0, out
    run = run_by_candidate(report, "hf", "autocast-float16")
    assert run["verdict"] == "parity" and report["findings"] == []
    floors = {p["name"]: p["noise_floor"] for p in run["points"]}
    assert 1e-5 < floors["L0.v"] < 1e-3 and floors["embed"] < 1e-6


def test_an_adapter_without_autocast_is_one_error_for_that_run(llmdiff_cli, mutants_on_path):
    code, _, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--dtype", "autocast-bfloat16",
                                       "--impl", "third_party_adapter:WrappedOracle", "--no-diagnose")
    assert code == 2
    assert "does not run autocast-bfloat16" in err
