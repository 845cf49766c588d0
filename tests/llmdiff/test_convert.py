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
