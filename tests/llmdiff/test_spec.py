import math

import pytest

from llmdiff.errors import UsageError
from llmdiff.spec import capture_points, get_spec, model_names, sqrt_rounds_differently_in_bf16


def test_published_numbers():
    s = get_spec("gemma-7b")
    assert (s.vocab_size, s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.mlp_dim) == (
        256000, 3072, 28, 16, 16, 256, 24576)
    s = get_spec("gemma-2b")
    assert (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.mlp_dim) == (
        2048, 18, 8, 1, 256, 16384)
    for name in model_names():
        s = get_spec(name)
        assert (s.activation, s.norm_eps, s.rope_base, s.tie_embeddings) == ("gelu_tanh", 1e-6, 10000.0, True)
        assert (s.pad_id, s.eos_id, s.bos_id) == (0, 1, 2)
        assert s.query_scale == 256 ** -0.5


@pytest.mark.parametrize("name", model_names())
def test_tiny_keeps_every_feature(name):
    full, tiny = get_spec(name), get_spec(name, tiny=True)
    assert tiny.tiny and tiny.hidden_size <= 512 and tiny.num_layers >= 2
    assert tiny.kv_groups == full.kv_groups
    assert (tiny.num_kv_heads == 1) == (full.num_kv_heads == 1)
    assert (tiny.hidden_size == tiny.num_heads * tiny.head_dim) == (full.hidden_size == full.num_heads * full.head_dim)
    assert tiny.mlp_dim / tiny.hidden_size == full.mlp_dim / full.hidden_size
    assert sqrt_rounds_differently_in_bf16(tiny.hidden_size)
    assert sqrt_rounds_differently_in_bf16(full.hidden_size)  # 3072: 55.4256 vs 55.5


def test_sqrt_rounding_examples():
    assert sqrt_rounds_differently_in_bf16(768)   # 27.7128 vs 27.75
    assert not sqrt_rounds_differently_in_bf16(256)
    assert math.sqrt(3072) != 55.5


def test_unknown_model_suggests():
    with pytest.raises(UsageError, match=r"unknown model 'gema-2b'; did you mean gemma-2b"):
        get_spec("gema-2b")


def test_capture_points_order():
    points = capture_points(get_spec("gemma-7b", tiny=True))
    assert points[0] == "embed" and points[-2:] == ["final_norm", "logits"]
    assert points[1:13] == ["L0.attn_norm", "L0.q", "L0.k", "L0.v", "L0.attn_out", "L0.resid_mid",
                            "L0.mlp_norm", "L0.mlp_gate", "L0.mlp_up", "L0.mlp_act", "L0.mlp_out", "L0.out"]
