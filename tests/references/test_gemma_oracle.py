"""The oracle's knobs each change what they claim to, and nothing else."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmdiff import convert, inputs, weights
from llmdiff.references import gemma
from llmdiff.spec import get_spec

jax.config.update("jax_enable_x64", True)
SPEC = get_spec("gemma-2b", tiny=True)  # multi-query: exercises the q/kv split


@pytest.fixture(scope="module")
def run():
    flat = convert.to_deepmind(SPEC, weights.random_weights(SPEC))
    tokens = jnp.asarray([inputs.synthetic_prompts(SPEC)[1]])
    cache = {}

    def forward(dtype, **knobs):
        key = (dtype, tuple(sorted(knobs.items())))
        if key not in cache:
            params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), convert.unflatten(flat))
            out = gemma.forward_jit(params, tokens, SPEC, gemma.Precision(**knobs))
            cache[key] = {k: np.asarray(v, np.float64) for k, v in out.items()}
        return cache[key]

    return forward


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_float32_is_close_to_float64(run):
    assert rel(run("float32")["logits"], run("float64")["logits"]) < 1e-5


def test_embedding_scale_rounded_to_the_dtype(run):
    tokens = inputs.synthetic_prompts(SPEC)[1]
    table = weights.random_weights(SPEC)["embed"]
    bf16 = run("bfloat16")["embed"][0]
    # sqrt(384) = 19.5959 is 19.625 in bfloat16: the product of two bf16 numbers, rounded
    expected = (table[tokens].astype(np.float64) * 19.625).astype(np.float32)
    from llmdiff.diff import round_to
    assert np.array_equal(bf16, round_to(expected, "bfloat16"))
    assert rel(run("bfloat16", embed_scale="python_float")["embed"], bf16) > 1e-3


def test_gelu_knob_acts_first_in_mlp_act(run):
    base, exact = run("float32"), run("float32", gelu="exact")
    assert np.array_equal(base["L0.mlp_gate"], exact["L0.mlp_gate"])
    assert rel(exact["L0.mlp_act"], base["L0.mlp_act"]) > 1e-4


def test_rope_knobs(run):
    base = run("bfloat16")
    low = run("bfloat16", rope_dtype="compute")
    assert np.array_equal(base["L0.v"], low["L0.v"])
    assert rel(low["L0.q"], base["L0.q"]) > 1e-2  # angles of positions up to 95 in bf16
    recip = run("float32", rope_form="mul_reciprocal")
    assert 0 < rel(recip["L0.q"], run("float32")["L0.q"]) < 1e-5  # an ulp here and there


def test_norm_scale_knob_only_matters_below_float32(run):
    assert rel(run("bfloat16", norm_scale="compute")["L0.attn_norm"], run("bfloat16")["L0.attn_norm"]) > 1e-3
    assert np.array_equal(run("float64", norm_scale="compute")["L0.attn_norm"], run("float64")["L0.attn_norm"]) or \
        rel(run("float64", norm_scale="compute")["L0.attn_norm"], run("float64")["L0.attn_norm"]) < 1e-15


def test_causal(run):
    """Changing a later token changes nothing before it."""
    flat = convert.to_deepmind(SPEC, weights.random_weights(SPEC))
    params = jax.tree_util.tree_map(jnp.asarray, convert.unflatten(flat))
    t = np.array([inputs.synthetic_prompts(SPEC)[0]])
    t2 = t.copy()
    t2[0, -1] = 5 if t[0, -1] != 5 else 6
    a = gemma.forward(params, jnp.asarray(t), SPEC, gemma.Precision())["logits"]
    b = gemma.forward(params, jnp.asarray(t2), SPEC, gemma.Precision())["logits"]
    assert np.array_equal(np.asarray(a)[0, :-1], np.asarray(b)[0, :-1])
    assert not np.array_equal(np.asarray(a)[0, -1], np.asarray(b)[0, -1])


# --- Gemma 2 / 3 ---------------------------------------------------------------------------

def _runner(spec):
    flat = convert.to_deepmind(spec, weights.random_weights(spec))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, "float32"), convert.unflatten(flat))
    cache = {}

    def forward(tokens=None, **knobs):
        tokens = inputs.synthetic_prompts(spec)[1] if tokens is None else tokens
        key = (tuple(tokens), tuple(sorted(knobs.items())))
        if key not in cache:
            out = gemma.forward_jit(params, jnp.asarray([tokens]), spec, gemma.Precision(**knobs))
            cache[key] = {k: np.asarray(v, np.float64)[0] for k, v in out.items()}
        return cache[key]

    return forward


@pytest.fixture(scope="module")
def gemma2():
    return get_spec("gemma-2-2b", tiny=True), _runner(get_spec("gemma-2-2b", tiny=True))


@pytest.fixture(scope="module")
def gemma3():
    return get_spec("gemma-3-4b", tiny=True), _runner(get_spec("gemma-3-4b", tiny=True))


def test_sliding_window_hides_keys_outside_it(gemma2):
    """Layer 0 slides: a token more than `window` positions back changes nothing at the query,
    unless the window is switched off (the knob setting where every layer attends globally)."""
    spec, run = gemma2
    tokens = inputs.synthetic_prompts(spec)[1]
    W, T, j = spec.sliding_window, len(tokens), 3
    assert spec.layer_types[:2] == ("local", "global") and T > W + j + 1  # the long prompt slides
    changed = list(tokens)
    changed[j] = 5 if tokens[j] != 5 else 6
    for knobs, hidden in (({}, True), ({"sliding_window": False}, False)):
        a, b = run(tokens, **knobs)["L0.out"], run(changed, **knobs)["L0.out"]
        inside = slice(j, j + W)          # queries that see position j: t - j < W
        outside = slice(j + W, T)         # queries for which j is outside the window
        assert not np.array_equal(a[inside], b[inside])
        assert np.array_equal(a[outside], b[outside]) == hidden, knobs
    # the global layer 1 always sees it
    assert not np.array_equal(run(tokens)["L1.out"][-1], run(changed)["L1.out"][-1])


def test_sliding_window_offset_moves_the_edge_by_one_key(gemma2):
    spec, run = gemma2
    base = run()["L0.attn_out"]
    W = spec.sliding_window
    for offset in (1, -1):
        moved = run(sliding_window_offset=offset)["L0.attn_out"]
        first = W if offset == 1 else W - 1  # first query whose visible keys change
        assert np.array_equal(moved[:first], base[:first])
        assert not np.array_equal(moved[first], base[first])


def test_layer_pattern_shift_swaps_local_and_global(gemma2):
    spec, run = gemma2
    assert gemma.layer_types(spec, gemma.Precision(layer_pattern_shift=1)) == ("global", "local")
    shifted = run(layer_pattern_shift=1)
    assert np.array_equal(shifted["L0.v"], run()["L0.v"])
    assert rel(shifted["L0.attn_out"], run()["L0.attn_out"]) > 1e-2
    g3 = get_spec("gemma-3-1b", tiny=True)
    assert gemma.layer_types(g3, gemma.Precision(layer_pattern_shift=1)) == ("local",) * 4 + ("global", "local")


def test_softcap_knobs_act_where_they_should(gemma2):
    spec, run = gemma2
    base, no_attn = run(), run(attn_softcap=False)
    assert np.array_equal(no_attn["L0.q"], base["L0.q"]) and np.array_equal(no_attn["L0.v"], base["L0.v"])
    assert rel(no_attn["L0.attn_out"], base["L0.attn_out"]) > 1e-5
    no_final = run(final_softcap=False)
    assert np.array_equal(no_final["final_norm"], base["final_norm"])
    assert rel(no_final["logits"], base["logits"]) > 1e-5
    assert np.abs(base["logits"]).max() < spec.final_softcap  # capped
    # cap * tanh(x / cap) of the uncapped logits, within float32 rounding
    assert np.allclose(base["logits"], 30 * np.tanh(no_final["logits"] / 30), rtol=1e-5, atol=1e-5)


def test_query_scale_knob():
    spec = get_spec("gemma-2-27b", tiny=True)
    assert spec.query_scale != spec.head_dim ** -0.5
    run = _runner(spec)
    wrong = run(query_scale="head_dim")
    assert np.array_equal(wrong["L0.q"], run()["L0.q"])  # q is captured before the scaling
    assert rel(wrong["L0.attn_out"], run()["L0.attn_out"]) > 1e-3


def test_gemma3_rope_bases_and_scaling_per_layer_type(gemma3):
    spec, run = gemma3
    assert spec.layer_types == ("local",) * 5 + ("global",) and spec.rope_scale == 8
    base, off = run(), run(rope_scaling=False)
    for i in range(5):  # local layers: base 10k, never scaled
        assert np.array_equal(off[f"L{i}.q"], base[f"L{i}.q"])
    assert rel(off["L5.q"], base["L5.q"]) > 1e-2
    # the global layer's angles: position / 1e6**(2i/H) / 8
    angles = gemma.rope_angles(4, spec.head_dim, spec.rope_base, gemma.Precision(), np.float32, spec.rope_scale)
    assert angles[3, 0] == np.float32(3 / 8)
    assert np.isclose(angles[3, 1], 3 / 1e6 ** (2 / spec.head_dim) / 8, rtol=1e-6)


def test_gemma3_qk_norm_before_rope(gemma3):
    """Position 0 has angle 0, so q there is exactly the RMS-normed head: rms_norm(q) * (1 + w)."""
    spec, run = gemma3
    canon = weights.random_weights(spec)
    x = run()["L0.attn_norm"][0].astype(np.float32)
    q = np.einsum("D,NDH->NH", x, canon["L0.q"]).astype(np.float32)
    normed = q / np.sqrt(np.mean(q * q, -1, keepdims=True) + 1e-6) * (1 + canon["L0.q_norm"])
    assert np.allclose(run()["L0.q"][0], normed, rtol=1e-4, atol=1e-5)


def test_new_knobs_change_nothing_on_gemma1(run):
    """Gemma 1 has no softcaps, windows, query scalar or RoPE scaling: its knobs are inert."""
    base = run("float32")
    for knobs in ({"attn_softcap": False}, {"final_softcap": False}, {"sliding_window_offset": 1},
                  {"layer_pattern_shift": 1}, {"query_scale": "head_dim"}, {"rope_scaling": False}):
        other = run("float32", **knobs)
        assert all(np.array_equal(other[k], base[k]) for k in base), knobs


def test_precision_knobs_are_checked_once_when_made():
    import pytest

    assert gemma.Precision(gelu="exact", attn_softcap=False, sliding_window_offset=1).gelu == "exact"
    with pytest.raises(ValueError, match="gelu='exakt'; choose from 'tanh', 'exact'"):
        gemma.Precision(gelu="exakt")
    with pytest.raises(ValueError, match="attn_softcap='off' must be bool"):
        gemma.Precision(attn_softcap="off")
    with pytest.raises(ValueError, match="attn_out_scale='x' must be float"):
        gemma.Precision(attn_out_scale="x")
    assert gemma.Precision(attn_out_scale=1).attn_out_scale == 1  # an int where a float is asked is fine


def test_longrope_factors_by_length_and_attention_factor():
    """Phi-3's LongRoPE: the short factors on a sequence within the original context, the long
    ones past it (the knob forces one list), and cos, sin times the attention factor (q's norm
    grows by it exactly, in float64)."""
    spec = get_spec("phi-3-mini-128k-instruct", tiny=True)
    short, long, original = spec.rope_longrope
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, "float64"),
                                    convert.unflatten(convert.to_deepmind(spec, weights.random_weights(spec))))
    prompts = inputs.synthetic_prompts(spec)
    assert len(prompts[0]) <= original < len(prompts[1])

    def q(tokens, **knobs):
        out = gemma.forward_jit(params, jnp.asarray([tokens]), spec, gemma.Precision(**knobs))
        return np.asarray(out["L0.q"], np.float64)

    for tokens, right, wrong in ((prompts[0], "short", "long"), (prompts[1], "long", "short")):
        base = q(tokens)
        assert np.array_equal(q(tokens, longrope_factors=right), base)
        assert rel(q(tokens, longrope_factors=wrong), base) > 1e-2
        plain = q(tokens, longrope_attention_factor=False)
        assert np.allclose(np.linalg.norm(base, axis=-1) / np.linalg.norm(plain, axis=-1),
                           spec.longrope_attention_factor, rtol=1e-12)
    # the angles: position / (factor * base ** (2i / H)), the list by the sequence's length
    T, H = len(prompts[1]), spec.head_dim
    scales = gemma.longrope_scales(spec, T, gemma.Precision())
    assert np.array_equal(scales, np.asarray(long)) and len(scales) == H // 2
    assert np.array_equal(gemma.longrope_scales(spec, original, gemma.Precision()), np.asarray(short))
    angles = gemma.rope_angles(T, H, spec.rope_base, gemma.Precision(), np.float64, scales)
    expected = np.arange(T)[:, None] / (np.asarray(long) * spec.rope_base ** (2 * np.arange(H // 2) / H))
    assert np.allclose(angles, expected, rtol=1e-15, atol=0)
