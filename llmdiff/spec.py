"""Model specs: the one place where architecture numbers live.

Every implementation's config is derived from a `ModelSpec`; nothing else invents
architecture numbers. This module is pure Python (stdlib only) because workers
running under a foreign interpreter import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str                      # "gemma" (Gemma 1); later "gemma2", "gemma3"
    vocab_size: int
    hidden_size: int                 # D, the residual width
    num_layers: int
    num_heads: int                   # N, query heads
    num_kv_heads: int                # K, key/value heads (K == 1: multi-query)
    head_dim: int                    # H; not always hidden_size / num_heads
    mlp_dim: int                     # F, width of each MLP branch
    activation: str = "gelu_tanh"    # GeGLU with the tanh approximation of GELU
    norm_eps: float = 1e-6           # x * rsqrt(mean(x^2) + eps) * (1 + w)
    embed_scale: str = "sqrt_hidden_rounded"  # embeddings * sqrt(D) rounded to the compute dtype
    rope_base: float = 10_000.0
    query_pre_attn_scalar: float = 0.0  # q is scaled by this ** -0.5; 0 means head_dim
    tie_embeddings: bool = True      # logits = h @ embed.T, no separate lm_head
    # Gemma 2 / 3 features (the defaults are Gemma 1's: none of them).
    attention_types: tuple[str, ...] = ()  # per layer "global" | "local"; () means all global
    sliding_window: int | None = None      # local layers: a key is visible within this many positions
    attn_softcap: float | None = None      # logits = cap * tanh(logits / cap), before the mask
    final_softcap: float | None = None     # the same on the output logits
    post_attn_norm: bool = False           # RMSNorm on the attention output before the residual add
    post_mlp_norm: bool = False            # RMSNorm on the MLP output before the residual add
    qk_norm: bool = False                  # RMSNorm on q and k (per head) before RoPE
    rope_base_local: float = 10_000.0      # RoPE base on local layers (`rope_base` is the global one)
    rope_scale: float = 1.0                # linear RoPE scaling factor on global layers
    rope_scale_local: float = 1.0          # ... and on local layers
    transpose_gating: bool = False         # DeepMind stores gating_einsum as (2, F, D), not (2, D, F)
    max_positions: int = 8192
    pad_id: int = 0
    eos_id: int = 1
    bos_id: int = 2
    tiny: bool = False

    @property
    def query_scale(self) -> float:
        """The factor q is multiplied by before q.k (DeepMind's `query_pre_attn_scalar()`)."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        # JSON turns tuples into lists; the spec must stay hashable (it is a static jit argument).
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# Published numbers. Gemma 1: https://huggingface.co/google/gemma-7b/blob/main/config.json,
# the Gemma report (arXiv:2403.08295) table 1, and DeepMind's gemma library.
_SPECS = {
    "gemma-2b": ModelSpec(
        name="gemma-2b", family="gemma", vocab_size=256_000, hidden_size=2048, num_layers=18,
        num_heads=8, num_kv_heads=1, head_dim=256, mlp_dim=16_384,
    ),
    "gemma-7b": ModelSpec(
        name="gemma-7b", family="gemma", vocab_size=256_000, hidden_size=3072, num_layers=28,
        num_heads=16, num_kv_heads=16, head_dim=256, mlp_dim=24_576,
    ),
}

TINY_VOCAB = 512
TINY_HEAD_DIMS = (32, 48, 24, 40, 56)


def model_names() -> list[str]:
    return sorted(_SPECS)


def get_spec(name: str, *, tiny: bool = False) -> ModelSpec:
    """The spec of a registered model; with `tiny`, a small model with every feature kept."""
    from llmdiff.errors import UsageError

    if name not in _SPECS:
        close = difflib.get_close_matches(name, _SPECS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown model {name!r}{hint} (known: {', '.join(model_names())})")
    spec = _SPECS[name]
    return shrink(spec) if tiny else spec


def sqrt_rounds_differently_in_bf16(n: int) -> bool:
    """True when sqrt(n) is not a bfloat16 number, so a python-float embedding scale differs."""
    root = math.sqrt(n)
    mantissa, exponent = math.frexp(root)  # root = mantissa * 2**exponent, 0.5 <= mantissa < 1
    return not (mantissa * 2**8).is_integer()  # bfloat16 keeps 8 significant bits


def shrink(spec: ModelSpec) -> ModelSpec:
    """A tiny version of `spec` that keeps every architectural feature.

    Kept: the query/kv head ratio (multi-query stays multi-query), whether head_dim equals
    hidden/heads, the MLP expansion ratio, and a hidden size whose square root is not a
    bfloat16 number (so embedding-scale rounding bugs stay visible).
    """
    kv = 1 if spec.num_kv_heads == 1 else min(spec.num_kv_heads, 4)
    heads = kv * spec.kv_groups
    head_dims_equal = spec.hidden_size == spec.num_heads * spec.head_dim
    for head_dim in TINY_HEAD_DIMS:
        if head_dims_equal:
            hidden = heads * head_dim
        else:
            ratio = spec.hidden_size / (spec.num_heads * spec.head_dim)
            hidden = max(16, round(ratio * heads * head_dim / 8) * 8)
            if hidden == heads * head_dim:
                hidden += 8
        if sqrt_rounds_differently_in_bf16(hidden):
            break
    else:  # pragma: no cover - the candidates above always contain a good one
        raise AssertionError(f"no tiny shape for {spec.name}")
    mlp = hidden * spec.mlp_dim // spec.hidden_size
    return dataclasses.replace(
        spec, name=spec.name, vocab_size=TINY_VOCAB, hidden_size=hidden, num_layers=2,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, mlp_dim=mlp,
        query_pre_attn_scalar=(head_dim if not spec.query_pre_attn_scalar else
                               spec.query_pre_attn_scalar * head_dim / spec.head_dim),
        max_positions=1024, tiny=True,
    )


LAYER_POINTS = ("attn_norm", "q", "k", "v", "attn_out", "resid_mid", "mlp_norm",
                "mlp_gate", "mlp_up", "mlp_act", "mlp_out", "out")


def capture_points(spec: ModelSpec) -> list[str]:
    """Canonical activation names in the order the forward pass computes them."""
    points = ["embed"]
    for i in range(spec.num_layers):
        points += [f"L{i}.{p}" for p in LAYER_POINTS]
    return points + ["final_norm", "logits"]
