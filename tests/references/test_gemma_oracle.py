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
