"""Llama 3.x, Qwen 2.5 / 3, Mistral and Phi-3 end to end: HF's own classes against the oracle,
tiny, every canonical point, float32 and bfloat16."""

from __future__ import annotations

import pytest

from conftest import run_by_candidate
from llmdiff.spec import LLAMA_LIKE_FAMILIES, capture_points, get_spec, model_names


SLOW = pytest.mark.slow  # the default suite keeps one case of each feature; CI runs the rest


@pytest.mark.parametrize("model,attn", [
    ("llama-3.1-8b", "eager"),     # untied head, llama3 RoPE bands
    pytest.param("llama-3.2-1b", "sdpa", marks=SLOW),      # tied, llama3 factor 32
    ("qwen2.5-0.5b", "sdpa"),      # q/k/v biases, tied, no <bos>
    pytest.param("qwen2.5-7b", "eager", marks=SLOW),       # untied
    ("qwen3-0.6b", "eager"),       # per-head q/k RMSNorm, head_dim != hidden / heads
    ("mistral-7b-v0.1", "sdpa"),   # a sliding window on every layer
    pytest.param("mistral-7b-v0.3", "eager", marks=SLOW),
    # Phi-3: fused qkv and gate_up; LongRoPE (the short prompt within the tiny original context,
    # the long one past it: both factor lists, and the attention factor on both)
    ("phi-3-mini-128k-instruct", "eager"),
    pytest.param("phi-3-mini-128k-instruct", "sdpa", marks=SLOW),
    ("phi-3-mini-4k-instruct", "sdpa"),        # a sliding window on every layer, Phi-3's mask
    pytest.param("phi-3-mini-4k-instruct", "eager", marks=SLOW),
    pytest.param("phi-3.5-mini-instruct", "sdpa", marks=SLOW),
])
def test_tiny_compare_is_parity(llmdiff_cli, model, attn):
    code, out, err, report = llmdiff_cli("compare", model, "--tiny", "--attn", attn, "--no-diagnose")
    assert code == 0, out + err
    spec = get_spec(model, tiny=True)
    for dtype in ("float32", "bfloat16"):
        run = run_by_candidate(report, "hf", dtype)
        assert run["verdict"] == "parity" and run["missing_points"] == []
        assert [p["name"] for p in run["points"]] == capture_points(spec)
    logits = next(p for p in run_by_candidate(report, "hf", "float32")["points"] if p["name"] == "logits")
    assert logits["rel_l2"] <= 1e-5


@pytest.mark.parametrize("model", ["llama-3.1-8b", pytest.param("qwen2.5-0.5b", marks=SLOW),
                                   pytest.param("phi-3-mini-128k-instruct", marks=SLOW)])  # fused in torch
def test_weights_made_on_the_workers_device_are_the_same_model(model):
    """Full-size runs make weights in each worker (untied heads and biases too): tiny here."""
    import llmdiff

    result = llmdiff.compare(model, tiny=True, generate=True, dtypes=["float32"], diagnose=False)
    assert result.report["weights"]["made"] == "on each worker's device"
    assert result, result.summary()


@pytest.mark.slow
@pytest.mark.parametrize("model", [m for m in model_names() if get_spec(m).family in LLAMA_LIKE_FAMILIES])
def test_every_new_model_tiny_is_parity(llmdiff_cli, model):
    """Each registered size's config (heads, groups, RoPE, ties) at parity in float32; each
    family's bfloat16 path is test_tiny_compare_is_parity's and the selftests' (CI's time)."""
    code, out, err, report = llmdiff_cli("compare", model, "--tiny", "--no-diagnose", "--dtype", "float32")
    assert code == 0, out + err
    logits = next(p for p in run_by_candidate(report, "hf", "float32")["points"] if p["name"] == "logits")
    assert logits["rel_l2"] <= 1e-5
