"""Gemma 1 in pure JAX: llmdiff's oracle. Read it top to bottom like a textbook.

It runs in float64, float32 or bfloat16 (the dtype of the params it is given), takes Google
DeepMind's parameter layout (`gemma.gm.nn.Transformer` params) directly, and returns every
canonical activation. Every numerical choice is made in `Precision`, and every known bug is a
named knob on it: checks flip one knob and re-run to confirm a diagnosis by counterfactual.

Shapes: B batch, T query positions, S key positions, D hidden, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim, F MLP width, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import jax
import jax.numpy as jnp
import numpy as np

from llmdiff.spec import ModelSpec


@dataclass(frozen=True)
class Precision:
    """The numerics of one run. Defaults are the reference conventions of the Gemma family."""

    # GeGLU's GELU: "tanh" approximation (what Gemma was trained with; flax's nn.gelu
    # default, HF `gelu_pytorch_tanh`) or "exact" erf GELU (HF's `hidden_act="gelu"` before
    # transformers 4.38.2).
    gelu: str = "tanh"
    # RMSNorm: "fp32" multiplies the normalised x by (1 + w) in float32 and rounds once
    # (HF after PR #29402, Keras); "compute" rounds the normalised x to the compute dtype
    # first and adds 1 to w in the compute dtype (transformers 4.38.0).
    norm_scale: str = "fp32"
    # Embedding normaliser: "rounded" = sqrt(D) rounded to the compute dtype first, as
    # DeepMind's `jnp.sqrt(embed_dim).astype(x.dtype)` (sqrt(3072)=55.4256 is 55.5 in bf16);
    # "python_float" = x * sqrt(D) with sqrt(D) a float, rounded once after the product.
    embed_scale: str = "rounded"
    # RoPE angles position/timescale in "fp32" (DeepMind, HF's `from_pretrained`) or in the
    # "compute" dtype (HF after `model.to(bfloat16)` cast `inv_freq`).
    rope_dtype: str = "fp32"
    # "div": position / base**(2i/H) (DeepMind); "mul_reciprocal": position * (1 / base**(2i/H))
    # (HF's `inv_freq`). Equal in exact arithmetic, an ulp apart in float32.
    rope_form: str = "div"
    # The dtype whose conventions apply to constants (the embedding normaliser). None: the
    # compute dtype. The float64 reference run of a bfloat16 comparison sets "bfloat16", so
    # it computes exactly what a bfloat16 model means, without bfloat16 rounding.
    constants_dtype: str | None = None

    @classmethod
    def knobs(cls) -> dict[str, object]:
        return {f.name: f.default for f in fields(cls)}


# ---------------------------------------------------------------------------------------
# Building blocks


def _wide(dtype) -> jnp.dtype:
    """float32, or float64 when the compute dtype is float64: where statistics are taken."""
    return jnp.promote_types(dtype, jnp.float32)


def rms_norm(x, w, eps: float, p: Precision):
    """x * rsqrt(mean(x^2) + eps) * (1 + w), statistics in at least float32."""
    xw = x.astype(_wide(x.dtype))
    # lax.rsqrt like DeepMind's RMSNorm (it differs from 1/sqrt in the last bit).
    normed = xw * jax.lax.rsqrt(jnp.mean(xw * xw, axis=-1, keepdims=True) + eps)
    if p.norm_scale == "fp32":
        return (normed * (1.0 + w.astype(xw.dtype))).astype(x.dtype)
    if p.norm_scale == "compute":
        return normed.astype(x.dtype) * (1.0 + w.astype(x.dtype))
    raise ValueError(f"norm_scale={p.norm_scale!r}")


def gelu(x, p: Precision):
    if p.gelu == "tanh":
        return jax.nn.gelu(x, approximate=True)
    if p.gelu == "exact":
        return jax.nn.gelu(x, approximate=False)
    raise ValueError(f"gelu={p.gelu!r}")


def rope_angles(T: int, H: int, base: float, p: Precision, dtype) -> np.ndarray:
    """position / base**(2i/H) for positions 0..T-1: a (T, H/2) table, computed on the host.

    numpy, not XLA, because XLA on CPU divides float32 by multiplying with a reciprocal
    (measured: 610 of 2304 angles of a 96-token, H=48 table differ from IEEE division), so
    in XLA the "div" and "mul_reciprocal" forms would be the same bits.
    """
    adt = np.dtype(dtype) if p.rope_dtype == "compute" else np.dtype(_wide(dtype))
    # The timescales, correctly rounded to the angle dtype.
    timescale = (float(base) ** (2 * np.arange(H // 2, dtype=np.float64) / H)).astype(adt)
    pos = np.arange(T, dtype=np.float64).astype(adt)[:, None]                      # (T, 1)
    if p.rope_form == "div":
        return pos / timescale
    if p.rope_form == "mul_reciprocal":
        return pos * (np.asarray(1, adt) / timescale)
    raise ValueError(f"rope_form={p.rope_form!r}")


def rope(x, angles):
    """Rotary embedding, half-rotated layout: x = [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin].

    x: (B, T, heads, H); angles: (T, H/2) from `rope_angles`.
    """
    angles = jnp.asarray(angles)
    sin = jnp.sin(angles)[None, :, None, :]                                         # (1, T, 1, H/2)
    cos = jnp.cos(angles)[None, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    # The rotation is applied in the angle dtype (x promotes), then rounded once, as DeepMind.
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def embed(table, tokens, hidden: int, p: Precision):
    x = table[tokens]                                                               # (B, T, D)
    if p.embed_scale == "rounded":
        constants = p.constants_dtype or x.dtype
        scale = jnp.asarray(math.sqrt(hidden), constants).astype(x.dtype)
        return x * scale
    if p.embed_scale == "python_float":
        wide = _wide(x.dtype)
        return (x.astype(wide) * jnp.asarray(math.sqrt(hidden), wide)).astype(x.dtype)
    raise ValueError(f"embed_scale={p.embed_scale!r}")


# ---------------------------------------------------------------------------------------
# The model


def attention(x, params, positions, spec: ModelSpec, p: Precision, cap: dict, i: int):
    N, K, G = spec.num_heads, spec.num_kv_heads, spec.kv_groups
    attn = params["attn"]
    if N == K:  # DeepMind fuses the three projections when there is one kv head per query head
        q, k, v = jnp.einsum("BTD,SNDH->SBTNH", x, attn["qkv_einsum"]["w"])
    else:
        q = jnp.einsum("BTD,NDH->BTNH", x, attn["q_einsum"]["w"])
        k, v = jnp.einsum("BSD,CKDH->CBSKH", x, attn["kv_einsum"]["w"])
    angles = rope_angles(x.shape[1], q.shape[-1], spec.rope_base, p, q.dtype)
    q = rope(q, angles)                                                            # (B, T, N, H)
    k = rope(k, angles)                                                            # (B, S, K, H)
    cap[f"L{i}.q"], cap[f"L{i}.k"], cap[f"L{i}.v"] = q, k, v

    B, T = q.shape[:2]
    q = q * jnp.asarray(spec.query_scale, q.dtype)  # scaled in the compute dtype, as DeepMind
    q = q.reshape(B, T, K, G, -1)                                                  # (B, T, K, G, H)
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", q, k)
    causal = positions[:, :, None] >= positions[:, None, :]                        # (B, T, S)
    logits = jnp.where(causal[:, :, None, None, :], logits, jnp.finfo(logits.dtype).min)
    # Softmax in at least float32, probabilities back in the compute dtype (DeepMind and HF).
    probs = jax.nn.softmax(logits.astype(_wide(logits.dtype)), axis=-1).astype(v.dtype)
    encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(B, T, N, -1)      # (B, T, N, H)
    return jnp.einsum("BTNH,NHD->BTD", encoded, attn["attn_vec_einsum"]["w"])


def mlp(x, params, p: Precision, cap: dict, i: int):
    gate, up = jnp.einsum("BTD,CDF->CBTF", x, params["gating_einsum"])            # 2 x (B, T, F)
    act = gelu(gate, p) * up
    out = jnp.einsum("BTF,FD->BTD", act, params["linear"])
    cap[f"L{i}.mlp_gate"], cap[f"L{i}.mlp_up"], cap[f"L{i}.mlp_act"] = gate, up, act
    return out


def block(x, params, positions, spec: ModelSpec, p: Precision, cap: dict, i: int):
    h = rms_norm(x, params["pre_attention_norm"]["scale"], spec.norm_eps, p)
    cap[f"L{i}.attn_norm"] = h
    a = attention(h, params, positions, spec, p, cap, i)
    cap[f"L{i}.attn_out"] = a
    x = x + a
    cap[f"L{i}.resid_mid"] = x
    h = rms_norm(x, params["pre_ffw_norm"]["scale"], spec.norm_eps, p)
    cap[f"L{i}.mlp_norm"] = h
    m = mlp(h, params["mlp"], p, cap, i)
    cap[f"L{i}.mlp_out"] = m
    x = x + m
    cap[f"L{i}.out"] = x
    return x


def forward(params, tokens, spec: ModelSpec, p: Precision) -> dict:
    """All canonical activations for `tokens` (B, T); the compute dtype is the params' dtype."""
    cap = {}
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    x = embed(params["embedder"]["input_embedding"], tokens, spec.hidden_size, p)
    cap["embed"] = x
    for i in range(spec.num_layers):
        x = block(x, params[f"layer_{i}"], positions, spec, p, cap, i)
    x = rms_norm(x, params["final_norm"]["scale"], spec.norm_eps, p)
    cap["final_norm"] = x
    # Tied embeddings: the output projection is the input table, transposed.
    cap["logits"] = jnp.einsum("BTD,VD->BTV", x, params["embedder"]["input_embedding"])
    return cap


forward_jit = jax.jit(forward, static_argnames=("spec", "p"))
