import numpy as np
import pytest

from llmdiff import convert, weights
from llmdiff.errors import WeightsError
from llmdiff.spec import get_spec


@pytest.mark.parametrize("name", ["gemma-7b", "gemma-2b"])  # fused qkv (K == N) and multi-query
def test_round_trips_are_bit_exact(name):
    spec = get_spec(name, tiny=True)
    canon = weights.random_weights(spec, seed=1)
    for to, back in ((convert.to_hf, convert.from_hf), (convert.to_deepmind, convert.from_deepmind)):
        again = back(spec, to(spec, canon))
        assert set(again) == set(canon)
        for k in canon:
            assert again[k].tobytes() == canon[k].tobytes(), k


def test_hf_layout_matches_the_documented_einsums():
    """DeepMind `q_einsum [N,D,H]` -> HF q_proj = w.transpose(0,2,1).reshape(N*H, D), and friends."""
    spec = get_spec("gemma-2b", tiny=True)
    canon = weights.random_weights(spec, seed=2)
    hf, dm = convert.to_hf(spec, canon), convert.to_deepmind(spec, canon)
    N, H, D = spec.num_heads, spec.head_dim, spec.hidden_size
    q = dm["layer_0/attn/q_einsum/w"]
    assert np.array_equal(hf["model.layers.0.self_attn.q_proj.weight"], q.transpose(0, 2, 1).reshape(N * H, D))
    o = dm["layer_0/attn/attn_vec_einsum/w"]
    assert np.array_equal(hf["model.layers.0.self_attn.o_proj.weight"], o.reshape(N * H, D).T)
    g = dm["layer_0/mlp/gating_einsum"]
    assert np.array_equal(hf["model.layers.0.mlp.gate_proj.weight"], g[0].T)
    assert np.array_equal(hf["model.layers.0.mlp.up_proj.weight"], g[1].T)
    assert np.array_equal(hf["model.layers.0.post_attention_layernorm.weight"], dm["layer_0/pre_ffw_norm/scale"])
    # x @ q_proj.T equals einsum('D,NDH->NH') flattened: the layouts compute the same thing
    x = np.random.default_rng(0).normal(size=D).astype(np.float32)
    assert np.allclose(x @ hf["model.layers.0.self_attn.q_proj.weight"].T, np.einsum("D,NDH->NH", x, q).ravel(), atol=1e-5)


def test_errors_name_the_tensor():
    spec = get_spec("gemma-7b", tiny=True)
    hf = convert.to_hf(spec, weights.random_weights(spec))
    del hf["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(WeightsError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        convert.from_hf(spec, hf)
    hf["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(WeightsError, match=r"shape mismatch: model.layers.1.mlp.up_proj.weight has shape \(3, 3\)"):
        convert.from_hf(spec, hf)


# --- Gemma 2 / 3 ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gemma-2-2b", "gemma-2-9b", "gemma-3-1b", "gemma-3-4b", "gemma-3-27b"])
def test_gemma2_gemma3_round_trips_are_bit_exact(name):
    """(2, D, F) and transposed (2, F, D) gating, q/k norms, post norms, both vocab mismatches."""
    spec = get_spec(name, tiny=True)
    canon = weights.random_weights(spec, seed=1)
    assert {"L0.post_attn_norm", "L0.post_mlp_norm"} <= set(canon)
    assert ("L0.q_norm" in canon) == spec.qk_norm
    for to, back in ((convert.to_hf, convert.from_hf), (convert.to_deepmind, convert.from_deepmind)):
        native = to(spec, canon)
        again = back(spec, native)
        assert set(again) == set(canon)
        for k in canon:
            assert again[k].tobytes() == canon[k].tobytes(), k
        # and native -> canonical -> native
        native_again = to(spec, again)
        assert all(native_again[k].tobytes() == native[k].tobytes() for k in native)


def test_gemma2_hf_names_post_attention_layernorm_is_after_attention():
    spec = get_spec("gemma-2-9b", tiny=True)
    canon = weights.random_weights(spec, seed=2)
    hf = convert.to_hf(spec, canon)
    p = "model.layers.1."
    assert np.array_equal(hf[p + "post_attention_layernorm.weight"], canon["L1.post_attn_norm"])
    assert np.array_equal(hf[p + "pre_feedforward_layernorm.weight"], canon["L1.mlp_norm"])
    assert np.array_equal(hf[p + "post_feedforward_layernorm.weight"], canon["L1.post_mlp_norm"])


def test_deepmind_gating_orientation():
    """DeepMind's `transpose_gating_einsum`: (2, F, D) for Gemma 2 9B/27B and Gemma 3, else (2, D, F)."""
    for name, transposed in (("gemma-2-2b", False), ("gemma-2-9b", True), ("gemma-3-4b", True)):
        spec = get_spec(name, tiny=True)
        canon = weights.random_weights(spec, seed=3)
        g = convert.to_deepmind(spec, canon)["layer_0/mlp/gating_einsum"]
        D, F = spec.hidden_size, spec.mlp_dim
        assert g.shape == ((2, F, D) if transposed else (2, D, F))
        assert np.array_equal(g[0].T if transposed else g[0], canon["L0.gate"])


def test_embedding_rows_follow_each_layout():
    """Gemma 2: DeepMind pads its table beyond HF's; Gemma 3 4B: HF's table is the longer one."""
    for name in ("gemma-2-2b", "gemma-3-4b"):
        spec = get_spec(name, tiny=True)
        canon = weights.random_weights(spec, seed=4)
        hf, dm = convert.to_hf(spec, canon), convert.to_deepmind(spec, canon)
        assert hf["model.embed_tokens.weight"].shape[0] == spec.hf_vocab_size
        assert dm["embedder/input_embedding"].shape[0] == spec.vocab_size
        V = spec.text_vocab_size
        assert np.array_equal(hf["model.embed_tokens.weight"][:V], dm["embedder/input_embedding"][:V])
        # the rows only one layout has are zero: no text id reaches them
        assert not hf["model.embed_tokens.weight"][V:].any() and not dm["embedder/input_embedding"][V:].any()


def test_phi3_fused_projections_round_trip_and_layout():
    """Phi-3's HF `qkv_proj` is q, k, v rows stacked, `gate_up_proj` the gate rows then the up
    rows (its forward's `chunk(2)`); a round trip is bit-exact, numpy and torch alike."""
    import torch

    spec = get_spec("phi-3-mini-128k-instruct", tiny=True)
    canon = weights.random_weights(spec, seed=3)
    hf = convert.to_hf(spec, canon)
    N, K, H, D, F = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size, spec.mlp_dim
    assert set(hf) == set(convert.hf_shapes(spec, lm_head=True))
    assert not any(n.endswith((".q_proj.weight", ".gate_proj.weight", ".up_proj.weight")) for n in hf)
    qkv, gate_up = hf["model.layers.1.self_attn.qkv_proj.weight"], hf["model.layers.1.mlp.gate_up_proj.weight"]
    assert qkv.shape == ((N + 2 * K) * H, D) and gate_up.shape == (2 * F, D)
    x = np.random.default_rng(0).normal(size=D).astype(np.float32)
    assert np.allclose((x @ qkv.T)[(N + K) * H:], np.einsum("D,KDH->KH", x, canon["L1.v"]).ravel(), atol=1e-5)
    gate, up = np.split(x @ gate_up.T, 2)
    assert np.allclose(gate, x @ canon["L1.gate"], atol=1e-5) and np.allclose(up, x @ canon["L1.up"], atol=1e-5)
    again = convert.from_hf(spec, hf)
    assert set(again) == set(canon) and all(again[k].tobytes() == canon[k].tobytes() for k in canon)
    layer = convert.to_hf_layer(spec, 1, {k: torch.from_numpy(v) for k, v in canon.items() if k.startswith("L1.")})
    assert all(layer[k].numpy().tobytes() == hf[k].tobytes() for k in layer)
