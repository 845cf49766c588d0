"""Gemma 1, 2 and 3 (text), Llama 3.x, Qwen 2.5 / 3, Mistral and Phi-3 in pure JAX: llmdiff's oracle.
Read it top to bottom like a textbook. One decoder; what a family changes is data in its
`ModelSpec`.

Gemma 2 adds a norm after attention and after the MLP, tanh soft-capping of the attention
logits and of the output logits, and sliding-window ("local") attention on every other layer.
Gemma 3 drops the soft-caps, adds an RMSNorm on each head of q and k before RoPE, slides on
five layers of six, and gives global layers their own RoPE base (and linear scaling).
Llama 3 uses SwiGLU, RMSNorm with w (not 1 + w) applied in the compute dtype, no embedding
normaliser, often an untied output head, and rescales RoPE frequencies in three bands
("llama3" scaling). Qwen2 adds biases to q, k and v; Qwen3 drops them for a per-head RMSNorm
of q and k (as Gemma 3). Mistral 7B v0.1 slides a window on every layer. Phi-3 is Llama's
block with a window on every layer and, on its 128k models, LongRoPE: one divisor per frequency,
from a short list or a long one by the sequence's length, and cos and sin scaled by a factor.

It runs in float64, float32 or bfloat16 (the dtype of the params it is given), takes Google
DeepMind's parameter layout (`gemma.gm.nn.Transformer` params) directly, and returns every
canonical activation. Every numerical choice is made in `Precision`, and every known bug is a
named knob on it: checks flip one knob and re-run to confirm a diagnosis by counterfactual.

Shapes: B batch, T query positions, S key positions, D hidden, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim, F MLP width, V vocab.
"""

from __future__ import annotations

import functools
import math
import dataclasses
from dataclasses import dataclass, fields

import jax
import jax.numpy as jnp
import numpy as np

from llmdiff.check import UNSCOPED_KNOBS
from llmdiff.spec import ModelSpec


@dataclass(frozen=True)
class Precision:
    """The numerics of one run. Defaults are the reference conventions of the Gemma family."""

    # GeGLU's GELU: "tanh" approximation (what Gemma was trained with; flax's nn.gelu
    # default, HF `gelu_pytorch_tanh`) or "exact" erf GELU (HF's `hidden_act="gelu"` before
    # transformers 4.38.2), or "f16_table": tanh GELU looked up at the float16 rounding of x
    # in a table of float16 results (llama.cpp's CPU backend, `gelu_f16_table`).
    gelu: str = "tanh"
    # RMSNorm: "fp32" multiplies the normalised x by (1 + w) in float32 and rounds once
    # (Gemma: HF after PR #29402, Keras); "compute" rounds the normalised x to the compute dtype
    # first and adds 1 to w in the compute dtype (transformers 4.38.0; Llama's own convention).
    # "spec": the family's (`spec.norm_scale_dtype`).
    norm_scale: str = "spec"
    # Embedding normaliser: "rounded" = sqrt(D) rounded to the compute dtype first, as
    # DeepMind's `jnp.sqrt(embed_dim).astype(x.dtype)` (sqrt(3072)=55.4256 is 55.5 in bf16);
    # "python_float" = x * sqrt(D) with sqrt(D) a float, rounded once after the product.
    embed_scale: str = "rounded"
    # RoPE angles position/timescale in "fp32" (DeepMind, HF's `from_pretrained`), all in the
    # "compute" dtype (positions, table and product), or "table_compute": only the frequency
    # table rounded to the compute dtype, the product in float32 (HF after `model.to(bfloat16)`
    # cast the `inv_freq` buffer, which the forward then upcasts).
    rope_dtype: str = "fp32"
    # "div": position / base**(2i/H) (DeepMind); "mul_reciprocal": position * (1 / base**(2i/H))
    # (HF's `inv_freq`). Equal in exact arithmetic, an ulp apart in float32.
    rope_form: str = "div"
    # The dtype whose conventions apply to constants (the embedding normaliser). None: the
    # compute dtype. The float64 reference run of a bfloat16 comparison sets "bfloat16", so
    # it computes exactly what a bfloat16 model means, without bfloat16 rounding.
    constants_dtype: str | None = None
    # Attention-logit soft-cap (Gemma 2: cap * tanh(logits / cap), before the mask). False
    # skips it: HF Gemma 2 under SDPA or flash-attention releases without softcap support.
    attn_softcap: bool = True
    # The same on the output logits (Gemma 2: 30). False skips it (servers that drop it).
    final_softcap: bool = True
    # Local layers let a query at position t see keys at s with t - s < window + offset.
    # 0 is DeepMind's `create_sliding_mask` and HF's `kv_idx > q_idx - window`; +1 lets one
    # more key in (a window counted as `t - s <= window`), -1 one fewer.
    sliding_window_offset: int = 0
    # False: no layer slides, every one attends globally (SDPA paths that lost the window).
    sliding_window: bool = True
    # True: every layer slides by the window config.json carries but switches off
    # (`spec.disabled_sliding_window`: Qwen 2.5's `sliding_window` under `use_sliding_window:
    # false`), as a port that reads `sliding_window` alone does. Nothing on a model without one.
    disabled_window_applied: bool = False
    # Layer i takes the attention type the spec gives layer i + shift of its pattern: 1 on
    # Gemma 2 puts the window on odd layers instead of even ones (the wrong parity); on Gemma 3
    # a global layer every 6th layer counted from 0 instead of from 1 is shift 1 too.
    layer_pattern_shift: int = 0
    # q is multiplied by "spec": `query_pre_attn_scalar ** -0.5` (144 on Gemma 2 27B, 168 on
    # Gemma 3 27B) or "head_dim": head_dim ** -0.5 (ports that assume the usual scaling), or
    # "hidden_over_heads": (hidden / heads) ** -0.5 (ports that derive head_dim; 192 on 7B).
    query_scale: str = "spec"
    # Linear RoPE scaling of global layers (Gemma 3 4B/12B/27B: angles / 8); False drops it
    # (configs that drop `rope_scaling`).
    rope_scaling: bool = True
    # RMSNorm scale: (1 + w) where the spec says so (Gemma); False: w alone (a Llama-style port
    # of Gemma weights).
    norm_plus_one: bool = True
    # Qwen2's q, k and v biases; False drops them (ports that build the projections bias-free).
    qkv_bias: bool = True
    # The per-head RMSNorm of q and k (Gemma 3, Qwen3); False drops it.
    qk_norm: bool = True
    # Llama 3's RoPE scaling in three bands; False divides every frequency by the factor (a
    # port that reads `rope_scaling` as linear scaling).
    llama3_bands: bool = True
    # LongRoPE's factors: "by_length", the long ones when the sequence is longer than the
    # original context, else the short ones (Phi-3's reference code, HF); "long" or "short",
    # one list whatever the length (ports that pick by the configured context, or read one list).
    longrope_factors: str = "by_length"
    # LongRoPE's attention factor on cos and sin; False leaves it out (ports that treat LongRoPE
    # as per-frequency scaling only).
    longrope_attention_factor: bool = True
    # RMSNorm's epsilon; 0.0: the spec's (`rms_norm_eps`). Ports that hard-code 1e-5 or 1e-6.
    norm_eps: float = 0.0
    # RoPE's base: "spec" (the config's `rope_theta`: Llama 3 500000, Qwen 1000000), or
    # "default": 10000 whatever the config says (ports that ignore `rope_theta`).
    rope_theta: str = "spec"
    # The per-head q/k RMSNorm (Qwen3, Gemma 3): "before_rope" (the models, HF) or "after_rope"
    # (ports that normalise the rotated q and k; the scale then acts on rotated features).
    qk_norm_order: str = "before_rope"
    # Its statistics: over each "head"'s H features (the models), or over "all_heads" of the
    # projection at once, the per-head scale tiled (a port with OLMo 2's whole-projection norm).
    qk_norm_scope: str = "head"
    # The output projection: "spec" (the untied head where the checkpoint has one), or
    # "embedding": the input table whatever the checkpoint holds (a port that ties every head).
    lm_head: str = "spec"
    # RoPE pairs: "half" rotates (x[i], x[i + H/2]) (Gemma, HF `rotate_half`); "interleaved"
    # rotates (x[2i], x[2i+1]) (GPT-J, Meta's original Llama code, complex-number RoPE).
    rope_layout: str = "half"
    # False drops the causal mask: every position sees the future (a missing or broken mask).
    causal: bool = True
    # Grouped-query attention: query head n reads kv head n // G ("grouped", as DeepMind's
    # reshape to (K, G) and HF's `repeat_kv`), or n % K ("tiled", `kv.repeat(1, G, 1, 1)`).
    kv_repeat: str = "grouped"
    # What masked attention logits become before the softmax: "min", the dtype's lowest value
    # (DeepMind, HF), or "zero" (ports that multiply the logits by a 0/1 mask: a masked key
    # still gets weight exp(0 - max)).
    mask_fill: str = "min"
    # Mixed precision: None, or the low dtype of an autocast run ("bfloat16"): float32 weights,
    # every matrix product (projections, q.k, probs.v, the output head) taking its inputs in the
    # low dtype and giving it, every other op in the dtype its inputs promote to. That is
    # `torch.autocast`'s lower-precision op list (`linear`, `matmul`, `bmm`, `baddbmm`, ...;
    # `torch/csrc/autograd/autocast_mode` / `aten/src/ATen/autocast_mode.cpp`, CPU and CUDA
    # alike for these): norms, softmax, RoPE, activations and residual adds are not on it.
    autocast: str | None = None
    # K and V rounded to float16 before q.k and probs.v (a float16 KV cache in a float32 model;
    # llama.cpp's flash attention casts an F32 cache's K and V to F16, src/llama-graph.cpp
    # `build_attn_mha`), everything else as it was. With `kv_f16_short` too, a prompt shorter
    # than 64 tokens takes ggml's CPU one-chunk kernel instead of its tiled one
    # (ggml-cpu/ops.cpp `ggml_compute_forward_flash_attn_ext_f16_one_chunk`, used below
    # `GGML_FA_TILE_Q` query rows): the scaled q rounded to float16 as well, and probs.v summed
    # key by key in a float16 accumulator through an online softmax (float32 max and sum).
    kv_f16: bool = False
    kv_f16_short: bool = False
    # The activation operand of every product with a weight matrix (q/k/v/o projections, gate,
    # up, down, the output head; not q.k or probs.v) rounded to Q8_0 along the reduction axis:
    # blocks of 32, scale max|x|/127 stored as float16, values round(x * 127/max) (half to even),
    # as ggml's CPU matmul does before a Q8_0 x Q8_0 dot product (`vec_dot_type` of Q8_0 is Q8_0:
    # ggml-cpu/ggml-cpu.c; `quantize_row_q8_0`, ggml-cpu/arch/x86/quants.c). A reduction that is
    # not a multiple of 32 rounds to float16 instead (the converter then writes the weight F16,
    # whose `vec_dot_type` is F16). Set by `--quant q8_0` (`Job.quant`); the weights' own rounding
    # is the oracle's (references/oracle.py).
    matmul_q8_0: bool = False
    # Multiplies the attention output. Not a known bug: the selftest's stand-in for a bug no
    # check knows, which must be reported as unexplained.
    attn_out_scale: float = 1.0
    # Training parity (`--grad`, references/gemma_grad.py): the implementation's own loss
    # function (the `loss:*` cases), never the forward. Its denominator: "targets" (the labels
    # not ignored) or every label position of the padded batch, "positions" (B*T, HF's labels
    # padded by one) or "predicting_positions" (B*(T-1)); the target of position t is the token
    # at t + `loss_label_shift` (1; 0: labels not shifted, 2: shifted twice); False: the loss
    # reads the logits before the final soft-cap.
    loss_denominator: str = "targets"
    loss_label_shift: int = 1
    loss_softcap: bool = True
    # Knobs that act on some layers only: ((scope, ((knob, value), ...)), ...), a scope being a
    # layer kind of the spec ("local": the sliding-window layers, "global") or one layer ("L3").
    # A port can be right on one kind of layer and wrong on the other (a mask built wrongly only
    # where the window applies). Written `knob@scope` in a policy dict (`from_knobs`).
    scoped: tuple = ()

    # The values each knob that names a form takes: checked once, when a policy is made.
    CHOICES = {"gelu": ("tanh", "exact", "f16_table"), "norm_scale": ("spec", "fp32", "compute"),
               "embed_scale": ("rounded", "python_float"), "rope_dtype": ("fp32", "compute", "table_compute"),
               "rope_form": ("div", "mul_reciprocal"), "constants_dtype": (None, "float32", "bfloat16"),
               "query_scale": ("spec", "head_dim", "hidden_over_heads"), "rope_layout": ("half", "interleaved"),
               "kv_repeat": ("grouped", "tiled"), "longrope_factors": ("by_length", "short", "long"),
               "mask_fill": ("min", "zero"), "autocast": (None, "bfloat16", "float16"), "rope_theta": ("spec", "default"),
               "qk_norm_order": ("before_rope", "after_rope"), "lm_head": ("spec", "embedding"),
               "qk_norm_scope": ("head", "all_heads"),
               "loss_denominator": ("targets", "positions", "predicting_positions")}
    UNSCOPED = UNSCOPED_KNOBS   # knobs of the whole model, never scoped

    def __post_init__(self):
        for scope, knobs in self.scoped:
            if not (scope in ("local", "global") or (scope[:1] == "L" and scope[1:].isdigit())):
                raise ValueError(f"precision knob scope {scope!r}; use local, global or L<layer>")
            for name, _ in knobs:
                if name in self.UNSCOPED or name not in self.knobs():
                    raise ValueError(f"precision knob {name!r} cannot act on one kind of layer only")
            Precision(**dict(knobs))   # the values themselves checked
        for f in fields(self):
            if f.name == "scoped":
                continue
            value = getattr(self, f.name)
            choices = self.CHOICES.get(f.name)
            if choices is not None and value not in choices:
                raise ValueError(f"precision knob {f.name}={value!r}; choose from {', '.join(map(repr, choices))}")
            if choices is None and type(value) is not type(f.default):
                if not (isinstance(f.default, float) and type(value) is int):
                    raise ValueError(f"precision knob {f.name}={value!r} must be {type(f.default).__name__}")

    @classmethod
    def knobs(cls) -> dict[str, object]:
        return {f.name: f.default for f in fields(cls) if f.name != "scoped"}

    @classmethod
    def from_knobs(cls, knobs: dict) -> "Precision":
        """A policy from a dict of knobs, `name@scope` for a knob acting on `scope` only."""
        plain, scoped = {}, {}
        for key, value in knobs.items():
            name, _, scope = key.partition("@")
            if scope:
                scoped.setdefault(scope, []).append((name, value))
            else:
                plain[name] = value
        return cls(**plain, scoped=tuple(sorted((k, tuple(sorted(v))) for k, v in scoped.items())))

    def at(self, layer: int, kind: str) -> "Precision":
        """The policy layer `layer` (of the spec's kind `kind`) runs with: the scoped knobs whose
        scope is its kind or itself on top of the others."""
        overrides = {name: value for scope, knobs in self.scoped if scope in (kind, f"L{layer}")
                     for name, value in knobs}
        return dataclasses.replace(self, scoped=(), **overrides) if self.scoped else self


# ---------------------------------------------------------------------------------------
# Building blocks


def _wide(dtype) -> jnp.dtype:
    """float32, or float64 when the compute dtype is float64: where statistics are taken."""
    return jnp.promote_types(dtype, jnp.float32)


def rms_norm(x, w, spec: ModelSpec, p: Precision):
    """x * rsqrt(mean(x^2) + eps) * (1 + w) (Gemma) or * w (Llama), statistics in at least float32."""
    xw = x.astype(_wide(x.dtype))
    # lax.rsqrt like DeepMind's RMSNorm (it differs from 1/sqrt in the last bit).
    normed = xw * jax.lax.rsqrt(jnp.mean(xw * xw, axis=-1, keepdims=True) + (p.norm_eps or spec.norm_eps))
    one = 1.0 if spec.norm_plus_one and p.norm_plus_one else 0.0
    where = spec.norm_scale_dtype if p.norm_scale == "spec" else p.norm_scale
    if where == "fp32":
        return (normed * (one + w.astype(xw.dtype))).astype(x.dtype)
    if where == "compute":
        # Under autocast the float32 scale multiplies as it is (HF: `self.weight * x.to(dtype)`).
        w = w if p.autocast else w.astype(x.dtype)
        return normed.astype(x.dtype) * (one + w if one else w)
    raise AssertionError(where)  # Precision and the spec checked it


def activation(x, spec: ModelSpec, p: Precision):
    """The gated MLP's nonlinearity: GELU (Gemma's GeGLU) or SiLU (SwiGLU)."""
    if spec.activation == "silu":
        return jax.nn.silu(x)
    if p.gelu == "tanh":
        return jax.nn.gelu(x, approximate=True)
    if p.gelu == "exact":
        return jax.nn.gelu(x, approximate=False)
    if p.gelu == "f16_table":
        return gelu_f16_table(x)
    raise AssertionError(p.gelu)


def gelu_f16_table(x):
    """llama.cpp's CPU GELU of float32 activations (ggml/src/ggml-cpu/vec.h, GGML_GELU_FP16 on
    by default: `ggml_vec_gelu_f32`, `ggml_vec_geglu_f32`): 0 at x <= -10, x at x >= 10, else
    `ggml_table_gelu_f16` read at the float16 rounding of x (`_GELU_F16_TABLE`)."""
    wide = _wide(x.dtype)
    xw = x.astype(wide)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float16), jnp.uint16).astype(jnp.int32)
    table = jnp.asarray(_gelu_f16_table()).astype(wide)[bits]
    return jnp.where(xw <= -10.0, 0.0, jnp.where(xw >= 10.0, xw, table)).astype(x.dtype)


@functools.lru_cache(maxsize=1)
def _gelu_f16_table() -> np.ndarray:
    """ggml's table, by float16 bit pattern (ggml-cpu.c fills it at start-up): the float32 tanh
    GELU `0.5f*x*(1.0f + tanhf(SQRT_2_OVER_PI*x*(1.0f + GELU_COEF_A*x*x)))` of every float16
    number, rounded to float16. Each float32 op as C does it; tanhf as float64 tanh rounded."""
    f = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        inner = np.float32(0.79788456080286535587989211986876) * f * (np.float32(1.0) + np.float32(0.044715) * f * f)
        tanh = np.tanh(inner.astype(np.float64)).astype(np.float32)
        return (np.float32(0.5) * f * (np.float32(1.0) + tanh)).astype(np.float16)


def llama3_rope_scales(H: int, base: float, llama3: tuple) -> np.ndarray:
    """Llama 3's per-frequency divisors (H/2,): 1 for wavelengths under original/high_freq_factor,
    `factor` above original/low_freq_factor, a smooth blend between (Meta's `apply_scaling`,
    HF's `_compute_llama3_parameters`). float64, on the host."""
    factor, low, high, original = llama3
    inv_freq = 1.0 / float(base) ** (2 * np.arange(H // 2, dtype=np.float64) / H)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, blended))


def longrope_scales(spec: ModelSpec, T: int, p: Precision) -> np.ndarray:
    """LongRoPE's per-frequency divisors (H/2,) for a sequence of T positions: the long factors
    when T exceeds the original context, else the short ones (Phi-3's
    `Phi3LongRoPEScaledRotaryEmbedding`, HF's `longrope_frequency_update`). float64, on the host."""
    short, long, original = spec.rope_longrope
    use_long = {"by_length": T > original, "long": True, "short": False}[p.longrope_factors]
    return np.asarray(long if use_long else short, np.float64)


def rope_angles(T: int, H: int, base: float, p: Precision, dtype, scale: float = 1.0) -> np.ndarray:
    """position / base**(2i/H) / scale for positions 0..T-1: a (T, H/2) table, on the host.

    numpy, not XLA, because XLA on CPU divides float32 by multiplying with a reciprocal
    (measured: 610 of 2304 angles of a 96-token, H=48 table differ from IEEE division), so
    in XLA the "div" and "mul_reciprocal" forms would be the same bits.
    `scale` is RoPE scaling, one divisor or one per frequency (Llama 3's bands): DeepMind
    divides the angles, HF divides `inv_freq`; a scale of 1 changes no bit.
    """
    if p.rope_dtype not in ("fp32", "compute", "table_compute"):
        raise AssertionError(p.rope_dtype)
    adt = np.dtype(dtype) if p.rope_dtype == "compute" else np.dtype(_wide(dtype))
    # The table's dtype: rounded to the compute dtype with "table_compute".
    tdt = np.dtype(dtype) if p.rope_dtype == "table_compute" else adt
    # The timescales, correctly rounded to the angle dtype.
    timescale = (float(base) ** (2 * np.arange(H // 2, dtype=np.float64) / H)).astype(adt)
    pos = np.arange(T, dtype=np.float64).astype(adt)[:, None]                      # (T, 1)
    scale = np.asarray(scale, adt)
    if p.rope_form == "div":
        return pos / (timescale * scale).astype(tdt).astype(adt)            # DeepMind's `apply_rope`
    if p.rope_form == "mul_reciprocal":  # HF: inv_freq = 1 / base**(2i/H), then inv_freq /= factor
        exact = 1.0 / (float(base) ** (2 * np.arange(H // 2, dtype=np.float64) / H)) / np.asarray(scale, np.float64)
        inv_freq = exact.astype(np.float32).astype(tdt).astype(adt)  # computed in float32, as HF
        return pos * inv_freq
    raise AssertionError(p.rope_form)


def matmul(subscripts: str, a, b, p: Precision):
    """A matrix product (einsum): under autocast its inputs in the autocast dtype, and so its
    output (accumulated in float32, as every bfloat16 matmul kernel does)."""
    if p.autocast:
        a, b = a.astype(p.autocast), b.astype(p.autocast)
    return jnp.einsum(subscripts, a, b)


def q8_0_round(x, n_axes: int = 1):
    """x with its last `n_axes` axes (flattened) rounded to Q8_0 blocks of 32 and back, in x's
    dtype (`Precision.matmul_q8_0`)."""
    shape = x.shape
    flat = x.reshape(*shape[:len(shape) - n_axes], -1)
    L = flat.shape[-1]
    if L % 32:
        return _f16(x)
    b = flat.reshape(*flat.shape[:-1], L // 32, 32)
    amax = jnp.max(jnp.abs(b), axis=-1, keepdims=True)
    d = amax / jnp.asarray(127, b.dtype)
    inv = jnp.where(amax != 0, jnp.asarray(127, b.dtype) / jnp.where(amax != 0, amax, 1), 0)
    q = jnp.round(b * inv)                                        # half to even, as _MM_ROUND_NEAREST
    return (q * d.astype(jnp.float16).astype(b.dtype)).reshape(shape)


def wmatmul(subscripts: str, x, w, p: Precision, n_axes: int = 1):
    """A product of activations `x` (reduced over their last `n_axes` axes) with a weight `w`:
    under `matmul_q8_0`, x rounded to Q8_0 first."""
    return matmul(subscripts, q8_0_round(x, n_axes) if p.matmul_q8_0 else x, w, p)


def softcap(x, cap: float):
    """cap * tanh(x / cap), in the dtype of x (DeepMind and HF round after each step)."""
    c = jnp.asarray(cap, x.dtype)
    return jnp.tanh(x / c) * c


def layer_types(spec: ModelSpec, p: Precision) -> tuple[str, ...]:
    """Each layer's attention, "local" or "global", after the knobs that get it wrong."""
    from llmdiff.spec import pattern_period

    types = spec.layer_types
    if not p.sliding_window:
        return ("global",) * spec.num_layers
    if p.disabled_window_applied and spec.disabled_sliding_window:
        return ("local",) * spec.num_layers
    period = pattern_period(types)
    return tuple(types[(i + p.layer_pattern_shift) % period] for i in range(spec.num_layers))


def rope(x, angles, p: Precision, factor: float = 1.0):
    """Rotary embedding, half-rotated layout: x = [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin].

    x: (B, T, heads, H); angles: (T, H/2) from `rope_angles`. factor: LongRoPE's attention
    factor, multiplying cos and sin in the angle dtype (HF: `emb.cos() * attention_scaling`).
    """
    angles = jnp.asarray(angles)
    sin = jnp.sin(angles)[None, :, None, :]                                         # (1, T, 1, H/2)
    cos = jnp.cos(angles)[None, :, None, :]
    if factor != 1.0:
        sin, cos = sin * factor, cos * factor
    if p.autocast:  # HF: cos and sin follow the float32 hidden states, whatever the angles' dtype
        sin, cos = sin.astype(jnp.float32), cos.astype(jnp.float32)
    if p.rope_layout == "half":
        x1, x2 = jnp.split(x, 2, axis=-1)
    elif p.rope_layout == "interleaved":
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        raise AssertionError(p.rope_layout)
    # The rotation is applied in the angle dtype (x promotes), then rounded once, as DeepMind;
    # under autocast it stays there (HF: bfloat16 q times float32 cos is float32).
    r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if p.rope_layout == "half":
        out = jnp.concatenate([r1, r2], axis=-1)
    else:
        out = jnp.stack([r1, r2], axis=-1).reshape(x.shape)
    return out if p.autocast else out.astype(x.dtype)


def embed(table, tokens, spec: ModelSpec, p: Precision):
    x = table[tokens]                                                               # (B, T, D)
    hidden = spec.hidden_size
    if spec.embed_scale == "none":  # Llama, Qwen, Mistral: the table's rows as they are
        return x
    if p.embed_scale == "rounded":
        constants = p.constants_dtype or x.dtype
        scale = jnp.asarray(math.sqrt(hidden), constants).astype(x.dtype)
        return x * scale
    if p.embed_scale == "python_float":
        wide = _wide(x.dtype)
        return (x.astype(wide) * jnp.asarray(math.sqrt(hidden), wide)).astype(x.dtype)
    raise AssertionError(p.embed_scale)


# ---------------------------------------------------------------------------------------
# The model


def qk_rms_norm(x, w, spec: ModelSpec, p: Precision):
    """The q/k norm of (B, T, heads, H): each head's features, or every head's at once."""
    if p.qk_norm_scope == "head":
        return rms_norm(x, w, spec, p)
    B, T, N, H = x.shape
    return rms_norm(x.reshape(B, T, N * H), jnp.tile(w, N), spec, p).reshape(B, T, N, H)


GGML_FA_TILE_Q = 64   # ggml's CPU flash attention: prompts of fewer query rows take the one-chunk kernel


def _f16(x):
    """x rounded to float16, kept in its dtype."""
    return x.astype(jnp.float16).astype(x.dtype)


def _ggml_one_chunk(logits, v, visible):
    """probs.v as ggml's CPU one-chunk flash attention computes it with an F16 V: for each query,
    keys in order, an online softmax (running max M and sum S in float32) whose V accumulator is
    float16, rounded after every rescale and every multiply-add; masked keys skipped; divided by
    S at the end. logits (B, T, K, G, S) already scaled, capped and masked; v (B, S, K, H)."""
    B, T, K, G, S = logits.shape
    wide = _wide(v.dtype)
    logits = logits.astype(wide)
    vis = jnp.broadcast_to(visible[:, :, None, None, :], logits.shape)

    def step(carry, j):
        M, total, acc = carry
        s, seen = logits[..., j], vis[..., j]
        new_max = seen & (s > M)
        ms = jnp.where(new_max, jnp.exp(M - s), 1.0).astype(wide)
        vs = jnp.where(new_max, 1.0, jnp.exp(s - M)).astype(wide)
        scaled = jnp.where(new_max[..., None], _f16(acc * ms[..., None]), acc)
        added = _f16(scaled + v[:, j].astype(wide)[:, None, :, None, :] * vs[..., None])
        return (jnp.where(seen, jnp.where(new_max, s, M), M), jnp.where(seen, total * ms + vs, total),
                jnp.where(seen[..., None], added, acc)), None

    init = (jnp.full((B, T, K, G), -jnp.inf, wide), jnp.zeros((B, T, K, G), wide),
            jnp.zeros((B, T, K, G, v.shape[-1]), wide))
    (_, total, acc), _ = jax.lax.scan(step, init, jnp.arange(S))
    return (acc / total[..., None]).astype(v.dtype)


def attention(x, params, positions, spec: ModelSpec, p: Precision, cap: "Tape", pre: str, kind: str):
    N, K, G, H = spec.num_heads, spec.num_kv_heads, spec.kv_groups, spec.head_dim
    attn = params["attn"]
    if N == K:  # DeepMind fuses the three projections when there is one kv head per query head
        q, k, v = wmatmul("BTD,SNDH->SBTNH", x, attn["qkv_einsum"]["w"], p)
    else:
        q = wmatmul("BTD,NDH->BTNH", x, attn["q_einsum"]["w"], p)
        k, v = wmatmul("BSD,CKDH->CBSKH", x, attn["kv_einsum"]["w"], p)
    if spec.qkv_bias and p.qkv_bias:  # Qwen2: each projection's bias, in the compute dtype
        q, k, v = q + attn["q_bias"].astype(q.dtype), k + attn["k_bias"].astype(k.dtype), v + attn["v_bias"].astype(v.dtype)
    qk_norm = spec.qk_norm and p.qk_norm
    if qk_norm and p.qk_norm_order == "before_rope":  # Gemma 3, Qwen3: RMSNorm over each head's H features
        q = qk_rms_norm(q, attn["_query_norm"]["scale"], spec, p)
        k = qk_rms_norm(k, attn["_key_norm"]["scale"], spec, p)
    local = kind == "local"
    base = spec.rope_base_local if local else spec.rope_base
    if p.rope_theta == "default":  # a port that ignores rope_theta: transformers' old default
        base = 10_000.0
    scale = (spec.rope_scale_local if local else spec.rope_scale) if p.rope_scaling else 1.0
    if spec.rope_llama3 and p.rope_scaling:
        scale = scale * (llama3_rope_scales(H, base, spec.rope_llama3) if p.llama3_bands else spec.rope_llama3[0])
    factor = 1.0
    if spec.rope_longrope and p.rope_scaling:  # Phi-3: every layer, factors by the sequence's length
        scale = scale * longrope_scales(spec, x.shape[1], p)
        factor = spec.longrope_attention_factor if p.longrope_attention_factor else 1.0
    angles = rope_angles(x.shape[1], H, base, p, p.autocast or q.dtype, scale)  # "compute": the low dtype
    q = rope(q, angles, p, factor)                                                 # (B, T, N, H)
    k = rope(k, angles, p, factor)                                                 # (B, S, K, H)
    if qk_norm and p.qk_norm_order == "after_rope":
        q = qk_rms_norm(q, attn["_query_norm"]["scale"], spec, p)
        k = qk_rms_norm(k, attn["_key_norm"]["scale"], spec, p)
    q, k, v = cap(f"{pre}q", q), cap(f"{pre}k", k), cap(f"{pre}v", v)

    B, T = q.shape[:2]
    if p.query_scale == "spec":
        query_scale = spec.query_scale
    elif p.query_scale == "head_dim":
        query_scale = H ** -0.5
    elif p.query_scale == "hidden_over_heads":
        query_scale = (spec.hidden_size // N) ** -0.5
    else:
        raise AssertionError(p.query_scale)
    one_chunk = p.kv_f16 and p.kv_f16_short and T < GGML_FA_TILE_Q
    if one_chunk and not spec.family.startswith("gemma"):
        q = _f16(q)   # llama.cpp scales q in its graph for Gemma only; ggml rounds the others unscaled
    q = q * jnp.asarray(query_scale, q.dtype)  # scaled in the compute dtype, as DeepMind
    if p.kv_repeat == "grouped":  # query head n = k * G + g reads kv head k
        q = q.reshape(B, T, K, G, -1)                                              # (B, T, K, G, H)
    elif p.kv_repeat == "tiled":  # query head n = g * K + k reads kv head k
        q = q.reshape(B, T, G, K, -1).swapaxes(2, 3)
    else:
        raise AssertionError(p.kv_repeat)
    if p.kv_f16:  # a float16 KV cache: K and V (and in ggml's one-chunk kernel q) at float16
        k, v = _f16(k), _f16(v)
        q = _f16(q) if one_chunk and spec.family.startswith("gemma") else q
    logits = matmul("BTKGH,BSKH->BTKGS", q, k, p)
    if spec.attn_softcap and p.attn_softcap:  # Gemma 2: before the mask
        logits = softcap(logits, spec.attn_softcap)
    # Positions, not sequence indices (DeepMind); equal here: one unpadded prompt from 0.
    distance = positions[:, :, None] - positions[:, None, :]                       # (B, T, S): t - s
    visible = distance >= 0 if p.causal else jnp.ones_like(distance, bool)        # causal
    if local:  # a key is visible when it is less than `window` positions before the query
        visible &= distance < (spec.sliding_window or spec.disabled_sliding_window) + p.sliding_window_offset
    fill = jnp.finfo(logits.dtype).min if p.mask_fill == "min" else jnp.zeros((), logits.dtype)
    logits = jnp.where(visible[:, :, None, None, :], logits, fill)
    if one_chunk:
        encoded = _ggml_one_chunk(logits, v, visible)
    else:
        # Softmax in at least float32, probabilities back in the compute dtype (DeepMind and HF).
        probs = jax.nn.softmax(logits.astype(_wide(logits.dtype)), axis=-1).astype(v.dtype)
        encoded = matmul("BTKGS,BSKH->BTKGH", probs, v, p)                     # (B, T, K, G, H)
    if p.kv_repeat == "tiled":
        encoded = encoded.swapaxes(2, 3)                                           # back to head order
    encoded = encoded.reshape(B, T, N, -1)                                         # (B, T, N, H)
    out = wmatmul("BTNH,NHD->BTD", encoded, attn["attn_vec_einsum"]["w"], p, 2)
    if p.attn_out_scale != 1.0:
        out = out * jnp.asarray(p.attn_out_scale, out.dtype)
    return out


def mlp(x, params, spec: ModelSpec, p: Precision, cap: "Tape", pre: str):
    if spec.transpose_gating:  # the (2, F, D) layout of Gemma 2 9B/27B and Gemma 3
        gate, up = wmatmul("BTD,CFD->CBTF", x, params["gating_einsum"], p)      # 2 x (B, T, F)
    else:
        gate, up = wmatmul("BTD,CDF->CBTF", x, params["gating_einsum"], p)      # 2 x (B, T, F)
    gate, up = cap(f"{pre}mlp_gate", gate), cap(f"{pre}mlp_up", up)
    act = cap(f"{pre}mlp_act", activation(gate, spec, p) * up)
    return wmatmul("BTF,FD->BTD", act, params["linear"], p)


def block(x, params, positions, spec: ModelSpec, p: Precision, cap: "Tape", pre: str, kind: str):
    """One decoder layer; its points are recorded as `pre` + name ("L3." + "q")."""
    h = cap(f"{pre}attn_norm", rms_norm(x, params["pre_attention_norm"]["scale"], spec, p))
    a = cap(f"{pre}attn_out", attention(h, params, positions, spec, p, cap, pre, kind))
    if spec.post_attn_norm:  # Gemma 2/3
        a = cap(f"{pre}post_attn_norm", rms_norm(a, params["post_attention_norm"]["scale"], spec, p))
    x = cap(f"{pre}resid_mid", x + a)
    h = cap(f"{pre}mlp_norm", rms_norm(x, params["pre_ffw_norm"]["scale"], spec, p))
    m = cap(f"{pre}mlp_out", mlp(h, params["mlp"], spec, p, cap, pre))
    if spec.post_mlp_norm:  # Gemma 2/3
        m = cap(f"{pre}post_mlp_norm", rms_norm(m, params["post_ffw_norm"]["scale"], spec, p))
    return cap(f"{pre}out", x + m)


class Tape(dict):
    """The captured points, by canonical name.

    Teacher forcing: with `forced` (another implementation's values of the same points), the
    computation goes on from the forced value of each point it records, so every point shows
    only the error of the one op that made it from forced inputs, not the error accumulated
    before it. Without `forced` it only records.
    """

    def __init__(self, forced: dict | None = None):
        super().__init__()
        self.forced = forced

    def __call__(self, name: str, value):
        # Every canonical point is materialised, rounded to the compute dtype, as an
        # implementation that computes it as a tensor does: XLA may not fuse its computation
        # into the next op's (see also the XLA flags set in references/oracle.py).
        value = jax.lax.optimization_barrier(value)
        self[name] = value
        if self.forced is not None and name in self.forced:
            return self.forced[name].astype(value.dtype)
        return value


def head(x, final_scale, table, spec: ModelSpec, p: Precision, cap: "Tape"):
    """Final norm and logits, recorded on `cap`."""
    x = cap("final_norm", rms_norm(x, final_scale, spec, p))
    # Tied embeddings: the output projection is the input table, transposed (untied: `table` is
    # the output head's). Only the columns of ids a text token can take (not DeepMind's padding
    # rows), as in every implementation.
    table = table[: spec.text_vocab_size]                                          # (V, D)
    logits = wmatmul("BTD,VD->BTV", x, table, p)
    if spec.final_softcap and p.final_softcap:  # Gemma 2, in the compute dtype
        logits = softcap(logits, spec.final_softcap)
    cap("logits", logits)


def forward(params, tokens, spec: ModelSpec, p: Precision, forced: dict | None = None) -> dict:
    """All canonical activations for `tokens` (B, T); the compute dtype is the params' dtype.

    forced: another implementation's captures, for teacher forcing (see `Tape`).
    """
    cap = Tape(forced)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    x = cap("embed", embed(params["embedder"]["input_embedding"], tokens, spec, p))
    for i, kind in enumerate(spec.layer_types):
        pi = p.at(i, kind)
        x = block(x, params[f"layer_{i}"], positions, spec, pi, cap, f"L{i}.", layer_types(spec, pi)[i])
    head(x, params["final_norm"]["scale"], output_table(params, p), spec, p, cap)
    return dict(cap)


forward_jit = jax.jit(forward, static_argnames=("spec", "p"))


def output_table(params, p: Precision | None = None) -> jnp.ndarray:
    """The output projection (V, D): the untied head where there is one (and `p.lm_head` keeps
    it), else the embedding."""
    untied = "lm_head" in params and (p is None or p.lm_head == "spec")
    return params["lm_head"] if untied else params["embedder"]["input_embedding"]


# ---------------------------------------------------------------------------------------
# The same model one block at a time


def _whole(caps, aux):
    return caps


@functools.partial(jax.jit, static_argnames=("spec", "p", "reduce"))
def _embed_step(table, tokens, forced, aux, spec, p, reduce):
    cap = Tape(forced)
    return cap("embed", embed(table, tokens, spec, p)), reduce(dict(cap), aux)


@functools.partial(jax.jit, static_argnames=("spec", "p", "kind", "reduce"))
def _block_step(x, params, forced, aux, spec, p, kind, reduce):
    cap = Tape(forced)
    B, T = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    return block(x, params, positions, spec, p, cap, "", kind), reduce(dict(cap), aux)


@functools.partial(jax.jit, static_argnames=("spec", "p", "reduce"))
def _head_step(x, final_scale, table, forced, aux, spec, p, reduce):
    cap = Tape(forced)
    head(x, final_scale, table, spec, p, cap)
    return reduce(dict(cap), aux)


def forward_blocks(layer, top, tokens, spec: ModelSpec, p: Precision, forced: dict | None = None,
                   reduce=_whole, aux=None, devices=None) -> dict:
    """`forward`, one jitted decoder block at a time, for models whose weights do not fit.

    layer(i): layer i's params, asked for only when block i runs (made or read then, and
    dropped after); top: {"embedder": ..., "final_norm": ..., and "lm_head" when untied}. reduce(caps, aux): what each
    step keeps of its captures (names without the "L3." prefix), traced into the step itself
    (a hashable function; `aux` its arrays), so memory holds one block's weights and
    activations. A block compiles once per attention kind, not once per layer.
    devices: the device of each layer's params (layers placed over several devices, embedding
    and head on the first): each step runs where its weights are, with the very kernels of one
    device, so the captures are those of one device.
    """
    def part(prefix):
        if forced is None:
            return None
        return {k[len(prefix):]: v for k, v in forced.items() if k.startswith(prefix)}

    def on(i, *trees):
        if devices is None:
            return trees
        return jax.device_put(trees, devices[i])

    table = top["embedder"]["input_embedding"]
    x, out = _embed_step(table, tokens, None if forced is None else {k: v for k, v in forced.items() if k == "embed"},
                         aux, spec, p, reduce)
    out = dict(out)
    for i, kind in enumerate(spec.layer_types):
        pi = p.at(i, kind)
        x_i, forced_i, aux_i = on(i, x, part(f"L{i}."), aux)
        x, caps = _block_step(x_i, layer(i), forced_i, aux_i, spec, pi, layer_types(spec, pi)[i], reduce)
        out.update({f"L{i}.{k}": v for k, v in caps.items()})
    names = ("final_norm", "logits")
    x, = on(0, x)
    out.update(_head_step(x, top["final_norm"]["scale"], output_table(top, p),
                          None if forced is None else {k: v for k, v in forced.items() if k in names},
                          aux, spec, p, reduce))
    return out
