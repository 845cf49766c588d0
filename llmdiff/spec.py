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
    # "gemma" (Gemma 1), "gemma2", "gemma3", "llama", "qwen2", "qwen3", "mistral", "phi3"
    family: str
    vocab_size: int                  # V, rows of the embedding table (DeepMind's, padded or not)
    hidden_size: int                 # D, the residual width
    num_layers: int
    num_heads: int                   # N, query heads
    num_kv_heads: int                # K, key/value heads (K == 1: multi-query)
    head_dim: int                    # H; not always hidden_size / num_heads
    mlp_dim: int                     # F, width of each MLP branch
    activation: str = "gelu_tanh"    # GeGLU with the tanh approximation of GELU; "silu": SwiGLU
    norm_eps: float = 1e-6           # x * rsqrt(mean(x^2) + eps) * (1 + w)
    # RMSNorm's scale: (1 + w) as Gemma stores it, or w alone (Llama, Qwen, Mistral).
    norm_plus_one: bool = True
    # Where the scale multiplies: "fp32", the normalised x times the scale in float32, rounded
    # once (Gemma: DeepMind and HF); "compute", the normalised x rounded to the compute dtype
    # first, then times the scale in it (Llama: Meta's `output.type_as(x) * self.weight`, HF).
    norm_scale_dtype: str = "fp32"
    embed_scale: str = "sqrt_hidden_rounded"  # embeddings * sqrt(D) rounded to the compute dtype; or "none"
    qkv_bias: bool = False           # biases on the q, k and v projections (Qwen2)
    # Llama 3's RoPE scaling of the frequencies: (factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings); None: none.
    rope_llama3: tuple | None = None
    # Phi-3's LongRoPE: (short_factors, long_factors, original_max_position_embeddings), one
    # divisor per frequency (H/2 each). A run whose sequence is longer than the original context
    # uses the long factors, else the short ones; cos and sin are multiplied by
    # `longrope_attention_factor` either way. None: none.
    rope_longrope: tuple | None = None
    rope_base: float = 10_000.0
    query_pre_attn_scalar: float = 0.0  # q is scaled by this ** -0.5; 0 means head_dim
    tie_embeddings: bool = True      # logits = h @ embed.T, no separate lm_head
    # Gemma 2 / 3 features (the defaults are Gemma 1's: none of them).
    attention_types: tuple[str, ...] = ()  # per layer "global" | "local"; () means all global
    sliding_window: int | None = None      # local layers: a key is visible within this many positions
    # A window config.json carries but switches off (Qwen 2.5: `sliding_window` under
    # `use_sliding_window: false`): no layer slides by it; a port that reads `sliding_window`
    # alone slides every layer by it (LD510).
    disabled_sliding_window: int | None = None
    attn_softcap: float | None = None      # logits = cap * tanh(logits / cap), before the mask
    final_softcap: float | None = None     # the same on the output logits
    post_attn_norm: bool = False           # RMSNorm on the attention output before the residual add
    post_mlp_norm: bool = False            # RMSNorm on the MLP output before the residual add
    qk_norm: bool = False                  # RMSNorm on q and k (per head) before RoPE
    rope_base_local: float = 10_000.0      # RoPE base on local layers (`rope_base` is the global one)
    rope_scale: float = 1.0                # linear RoPE scaling factor on global layers
    rope_scale_local: float = 1.0          # ... and on local layers
    transpose_gating: bool = False         # DeepMind stores gating_einsum as (2, F, D), not (2, D, F)
    hf_vocab_size: int | None = None       # HF's embedding rows where they differ from DeepMind's
    # HF stores q, k, v as one `qkv_proj` and gate, up as one `gate_up_proj` (Phi-3).
    hf_fused_projections: bool = False
    max_positions: int = 8192
    pad_id: int | None = 0
    eos_id: int = 1
    bos_id: int = 2
    add_bos: bool = True             # prompts start with <bos> (Qwen's do not)
    tiny: bool = False

    @property
    def query_scale(self) -> float:
        """The factor q is multiplied by before q.k (DeepMind's `query_pre_attn_scalar()`)."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def text_vocab_size(self) -> int:
        """Ids a text token can take: rows both DeepMind's and HF's tables have.

        DeepMind pads Gemma 2's table to 256128 rows (HF keeps the tokenizer's 256000); HF's
        Gemma 3 4B/12B/27B tables have 262208 rows (DeepMind's 262144). Logits are compared
        over these columns only.
        """
        return min(self.vocab_size, self.hf_vocab_size or self.vocab_size)

    @property
    def layer_types(self) -> tuple[str, ...]:
        """Each layer's attention: "local" (sliding window) or "global"."""
        return self.attention_types or ("global",) * self.num_layers

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def longrope_attention_factor(self) -> float:
        """LongRoPE's factor on cos and sin: sqrt(1 + ln(s) / ln(original)) with s the context
        extension max_positions / original (Phi-3's `scaling_factor`, HF's `attention_factor`
        in `_compute_longrope_parameters`); 1 without LongRoPE or extension."""
        if not self.rope_longrope:
            return 1.0
        original = self.rope_longrope[2]
        scale = self.max_positions / original
        return 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        # JSON turns tuples into lists; the spec must stay hashable (it is a static jit argument).
        def frozen(v):
            return tuple(map(frozen, v)) if isinstance(v, list) else v
        return cls(**{k: frozen(v) for k, v in d.items()})


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


def _pattern(unit: tuple[str, ...], num_layers: int) -> tuple[str, ...]:
    """`unit` repeated over `num_layers` layers, cut where the layers end (DeepMind's
    `make_attention_layers_types`)."""
    return tuple(unit[i % len(unit)] for i in range(num_layers))


_GEMMA2 = ("local", "global")                                    # alternating, local first
_GEMMA3 = ("local",) * 5 + ("global",)                           # five local, then one global

# Gemma 2 and 3: Google DeepMind's gemma library (`gemma/gm/nn/_gemma.py`, the reference for
# every number here), cross-checked with the HF configs (google/gemma-2-*, google/gemma-3-*
# config.json) and the Gemma 2 (arXiv:2408.00118) and Gemma 3 (arXiv:2503.19786) reports.
# Where DeepMind and HF disagree, DeepMind's value is the spec's, and the comment says so.
_SPECS.update({
    # Embeddings: DeepMind's table has 256128 rows (padded to a multiple of 128); HF's
    # config.json and checkpoints have the tokenizer's 256000. No text id reaches the padding.
    "gemma-2-2b": ModelSpec(
        name="gemma-2-2b", family="gemma2", vocab_size=256_128, hf_vocab_size=256_000,
        hidden_size=2304, num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256, mlp_dim=9216,
        attention_types=_pattern(_GEMMA2, 26), sliding_window=4096, attn_softcap=50.0,
        final_softcap=30.0, post_attn_norm=True, post_mlp_norm=True,
        # DeepMind's Gemma2_2B leaves `transpose_gating_einsum` False; the 9B and 27B set it.
        transpose_gating=False,
    ),
    "gemma-2-9b": ModelSpec(
        name="gemma-2-9b", family="gemma2", vocab_size=256_128, hf_vocab_size=256_000,
        hidden_size=3584, num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256, mlp_dim=14_336,
        attention_types=_pattern(_GEMMA2, 42), sliding_window=4096, attn_softcap=50.0,
        final_softcap=30.0, post_attn_norm=True, post_mlp_norm=True, transpose_gating=True,
    ),
    "gemma-2-27b": ModelSpec(
        name="gemma-2-27b", family="gemma2", vocab_size=256_128, hf_vocab_size=256_000,
        hidden_size=4608, num_layers=46, num_heads=32, num_kv_heads=16, head_dim=128, mlp_dim=36_864,
        # DeepMind: BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS, q * (4608 // 32) ** -0.5 = 144 ** -0.5,
        # not head_dim 128 (HF: query_pre_attn_scalar=144).
        query_pre_attn_scalar=144,
        attention_types=_pattern(_GEMMA2, 46), sliding_window=4096, attn_softcap=50.0,
        final_softcap=30.0, post_attn_norm=True, post_mlp_norm=True, transpose_gating=True,
    ),
    # Gemma 3: q/k RMSNorm, no softcaps, RoPE base 10k local / 1M global. The 270M and 1B have
    # no RoPE scaling (DeepMind leaves `global_scale_factor` at 1.0; HF rope_scaling null).
    "gemma-3-270m": ModelSpec(
        name="gemma-3-270m", family="gemma3", vocab_size=262_144, hidden_size=640, num_layers=18,
        num_heads=4, num_kv_heads=1, head_dim=256, mlp_dim=2048,
        attention_types=_pattern(_GEMMA3, 18), sliding_window=512, post_attn_norm=True,
        post_mlp_norm=True, qk_norm=True, rope_base=1_000_000.0, rope_base_local=10_000.0,
        transpose_gating=True, max_positions=32_768,
    ),
    "gemma-3-1b": ModelSpec(
        name="gemma-3-1b", family="gemma3", vocab_size=262_144, hidden_size=1152, num_layers=26,
        num_heads=4, num_kv_heads=1, head_dim=256, mlp_dim=6912,
        attention_types=_pattern(_GEMMA3, 26), sliding_window=512, post_attn_norm=True,
        post_mlp_norm=True, qk_norm=True, rope_base=1_000_000.0, rope_base_local=10_000.0,
        transpose_gating=True, max_positions=32_768,
    ),
    # 4B, 12B, 27B: linear RoPE scaling by 8 on global layers only. Embeddings: DeepMind's
    # table has 262144 rows; HF's text config says 262208 (64 more rows, for image tokens).
    "gemma-3-4b": ModelSpec(
        name="gemma-3-4b", family="gemma3", vocab_size=262_144, hf_vocab_size=262_208,
        hidden_size=2560, num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256, mlp_dim=10_240,
        attention_types=_pattern(_GEMMA3, 34), sliding_window=1024, post_attn_norm=True,
        post_mlp_norm=True, qk_norm=True, rope_base=1_000_000.0, rope_base_local=10_000.0,
        rope_scale=8.0, transpose_gating=True, max_positions=131_072,
    ),
    "gemma-3-12b": ModelSpec(
        name="gemma-3-12b", family="gemma3", vocab_size=262_144, hf_vocab_size=262_208,
        hidden_size=3840, num_layers=48, num_heads=16, num_kv_heads=8, head_dim=256, mlp_dim=15_360,
        attention_types=_pattern(_GEMMA3, 48), sliding_window=1024, post_attn_norm=True,
        post_mlp_norm=True, qk_norm=True, rope_base=1_000_000.0, rope_base_local=10_000.0,
        rope_scale=8.0, transpose_gating=True, max_positions=131_072,
    ),
    "gemma-3-27b": ModelSpec(
        name="gemma-3-27b", family="gemma3", vocab_size=262_144, hf_vocab_size=262_208,
        hidden_size=5376, num_layers=62, num_heads=32, num_kv_heads=16, head_dim=128, mlp_dim=21_504,
        # DeepMind: q * (5376 // 32) ** -0.5 = 168 ** -0.5, not head_dim 128 (HF: 168).
        query_pre_attn_scalar=168,
        attention_types=_pattern(_GEMMA3, 62), sliding_window=1024, post_attn_norm=True,
        post_mlp_norm=True, qk_norm=True, rope_base=1_000_000.0, rope_base_local=10_000.0,
        rope_scale=8.0, transpose_gating=True, max_positions=131_072,
    ),
})

# Llama 3.x, Qwen 2.5 / 3 and Mistral: one decoder with Llama's conventions (SwiGLU, RMSNorm
# with w alone, scaled in the compute dtype, no embedding normaliser) and the family's
# differences as data. Numbers from each model's HF config.json (meta-llama/Llama-3.1-8B, ...).
_LLAMA_LIKE = dict(activation="silu", norm_plus_one=False, norm_scale_dtype="compute", embed_scale="none")


def _llama3(name, hidden, layers, heads, mlp, *, head_dim=128, tied=False, factor=8.0):
    return ModelSpec(
        name=name, family="llama", vocab_size=128_256, hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=8, head_dim=head_dim, mlp_dim=mlp, norm_eps=1e-5,
        rope_base=500_000.0, rope_base_local=500_000.0, rope_llama3=(factor, 1.0, 4.0, 8192),
        tie_embeddings=tied, max_positions=131_072, pad_id=None, bos_id=128_000, eos_id=128_001,
        **_LLAMA_LIKE)


def _qwen(name, family, hidden, layers, heads, kv, mlp, *, vocab=151_936, head_dim=None, tied=False,
          eps=1e-6, max_positions=131_072):
    return ModelSpec(
        name=name, family=family, vocab_size=vocab, hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim or hidden // heads, mlp_dim=mlp, norm_eps=eps,
        rope_base=1_000_000.0, rope_base_local=1_000_000.0, tie_embeddings=tied,
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3", max_positions=max_positions,
        # Qwen 2.5's config.json: `sliding_window` as long as the context, `use_sliding_window`
        # false (Qwen3's says null).
        disabled_sliding_window=max_positions if family == "qwen2" else None,
        # Qwen3's repos are the post-trained models: they end a turn with <|im_end|> (151645).
        pad_id=151_643, bos_id=151_643, eos_id=151_645 if family == "qwen3" else 151_643, add_bos=False,
        **_LLAMA_LIKE)


_SPECS.update({
    "llama-3.1-8b": _llama3("llama-3.1-8b", 4096, 32, 32, 14_336),
    "llama-3.1-70b": _llama3("llama-3.1-70b", 8192, 80, 64, 28_672),
    "llama-3.1-405b": _llama3("llama-3.1-405b", 16_384, 126, 128, 53_248),
    "llama-3.2-1b": _llama3("llama-3.2-1b", 2048, 16, 32, 8192, head_dim=64, tied=True, factor=32.0),
    "llama-3.2-3b": _llama3("llama-3.2-3b", 3072, 28, 24, 8192, tied=True, factor=32.0),
    "qwen2.5-0.5b": _qwen("qwen2.5-0.5b", "qwen2", 896, 24, 14, 2, 4864, tied=True, max_positions=32_768),
    "qwen2.5-1.5b": _qwen("qwen2.5-1.5b", "qwen2", 1536, 28, 12, 2, 8960, tied=True),
    "qwen2.5-3b": _qwen("qwen2.5-3b", "qwen2", 2048, 36, 16, 2, 11_008, tied=True, max_positions=32_768),
    "qwen2.5-7b": _qwen("qwen2.5-7b", "qwen2", 3584, 28, 28, 4, 18_944, vocab=152_064),
    "qwen2.5-14b": _qwen("qwen2.5-14b", "qwen2", 5120, 48, 40, 8, 13_824, vocab=152_064, eps=1e-5),
    "qwen2.5-32b": _qwen("qwen2.5-32b", "qwen2", 5120, 64, 40, 8, 27_648, vocab=152_064, eps=1e-5),
    "qwen2.5-72b": _qwen("qwen2.5-72b", "qwen2", 8192, 80, 64, 8, 29_568, vocab=152_064, eps=1e-5),
    "qwen3-0.6b": _qwen("qwen3-0.6b", "qwen3", 1024, 28, 16, 8, 3072, head_dim=128, tied=True, max_positions=40_960),
    "qwen3-1.7b": _qwen("qwen3-1.7b", "qwen3", 2048, 28, 16, 8, 6144, head_dim=128, tied=True, max_positions=40_960),
    "qwen3-4b": _qwen("qwen3-4b", "qwen3", 2560, 36, 32, 8, 9728, head_dim=128, tied=True, max_positions=40_960),
    "qwen3-8b": _qwen("qwen3-8b", "qwen3", 4096, 36, 32, 8, 12_288, head_dim=128, max_positions=40_960),
    "qwen3-14b": _qwen("qwen3-14b", "qwen3", 5120, 40, 40, 8, 17_408, head_dim=128, max_positions=40_960),
    "qwen3-32b": _qwen("qwen3-32b", "qwen3", 5120, 64, 64, 8, 25_600, head_dim=128, max_positions=40_960),
    # Mistral 7B v0.1 slides a 4096 window on every layer; v0.3 has none, and a larger vocabulary.
    "mistral-7b-v0.1": ModelSpec(
        name="mistral-7b-v0.1", family="mistral", vocab_size=32_000, hidden_size=4096, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14_336, norm_eps=1e-5,
        attention_types=("local",) * 32, sliding_window=4096, tie_embeddings=False, max_positions=32_768,
        pad_id=None, bos_id=1, eos_id=2, **_LLAMA_LIKE),
    "mistral-7b-v0.3": ModelSpec(
        name="mistral-7b-v0.3", family="mistral", vocab_size=32_768, hidden_size=4096, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14_336, norm_eps=1e-5, rope_base=1_000_000.0,
        rope_base_local=1_000_000.0, tie_embeddings=False, max_positions=32_768, pad_id=None, bos_id=1,
        eos_id=2, **_LLAMA_LIKE),
})

# Phi-3 mini and Phi-3.5 mini: Llama's block (SwiGLU, RMSNorm with w, eps 1e-5, no GQA) with
# HF's q, k, v and gate, up fused into one projection each, an untied head, a sliding window on
# every layer, and LongRoPE on the 128k models. Numbers from each repo's config.json
# (microsoft/Phi-3-mini-4k-instruct, microsoft/Phi-3-mini-128k-instruct after its July 2024
# update, microsoft/Phi-3.5-mini-instruct) and `Phi3Config` (transformers 5.x); the factor
# lists as published (float32 values, Phi-3's short ones float64 sums), cross-checked with
# Microsoft's own copies (the 128k's in microsoft/LongRoPE-style eval scripts).
_PHI3 = dict(family="phi3", vocab_size=32_064, hidden_size=3072, num_layers=32, num_heads=32, num_kv_heads=32,
             head_dim=96, mlp_dim=8192, norm_eps=1e-5, tie_embeddings=False, hf_fused_projections=True,
             attention_types=("local",) * 32, pad_id=32_000, bos_id=1, eos_id=32_000, **_LLAMA_LIKE)
_PHI3_128K_SHORT = (
    1.1, 1.1, 1.1, 1.3000000000000003, 1.3500000000000003, 1.3500000000000003, 1.4000000000000004,
    1.5500000000000005, *(2.000000000000001,) * 17, *(2.0500000000000007,) * 6, 2.1000000000000005,
    2.1000000000000005, 2.1500000000000004, *(2.25,) * 5, 2.3999999999999995, 2.4499999999999993, 2.499999999999999,
    2.6999999999999984, 2.6999999999999984, 2.7499999999999982, 2.799999999999998, 2.8999999999999977,
    3.049999999999997)
_PHI3_128K_LONG = (
    1.0700000524520874, 1.1200000047683716, 1.149999976158142, 1.4199999570846558, 1.5699999332427979,
    1.7999999523162842, 2.129999876022339, 2.129999876022339, 3.009999990463257, 5.910000324249268,
    6.950000286102295, 9.070000648498535, 9.930000305175781, 10.710000038146973, 11.130000114440918,
    14.609999656677246, 15.409998893737793, 19.809999465942383, 37.279998779296875, 38.279998779296875,
    38.599998474121094, 40.12000274658203, 46.20000457763672, 50.940006256103516, 53.66000747680664,
    54.9373893737793, 56.89738845825195, 57.28738784790039, 59.98738479614258, 60.86738586425781,
    60.887386322021484, 61.71739196777344, 62.91739273071289, 62.957393646240234, 63.41739273071289,
    63.8173942565918, 63.83739471435547, 63.897396087646484, 63.93739700317383, 64.06739807128906,
    64.11434936523438, 64.12435150146484, 64.15435028076172, 64.19435119628906, 64.24435424804688,
    64.57435607910156, 64.69000244140625, 64.76000213623047)
_PHI35_SHORT = (
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, *(1.0499999523162842,) * 5,
    1.0699999332427979, 1.0999999046325684, 1.1099998950958252, 1.1599998474121094, 1.1599998474121094,
    1.1699998378753662, 1.2899998426437378, 1.339999794960022, 1.679999828338623, 1.7899998426437378,
    1.8199998140335083, 1.8499997854232788, 1.8799997568130493, 1.9099997282028198, 1.9399996995925903,
    1.9899996519088745, *(2.0199997425079346,) * 6, *(2.0299997329711914,) * 9, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
    2.749999523162842, 2.8399994373321533)
_PHI35_LONG = (
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062)
_SPECS.update({
    # 4k: no RoPE scaling; a 2047-token window on every layer (config.json `sliding_window`),
    # which a 4096-token context reaches.
    "phi-3-mini-4k-instruct": ModelSpec(name="phi-3-mini-4k-instruct", sliding_window=2047, max_positions=4096,
                                        **_PHI3),
    # 128k: LongRoPE over an original 4096-token context (attention factor sqrt(1 + ln 32 / ln
    # 4096) = 1.19); `sliding_window` 262144 is twice the context, so it never binds.
    "phi-3-mini-128k-instruct": ModelSpec(
        name="phi-3-mini-128k-instruct", sliding_window=262_144, max_positions=131_072,
        rope_longrope=(_PHI3_128K_SHORT, _PHI3_128K_LONG, 4096), **_PHI3),
    "phi-3.5-mini-instruct": ModelSpec(
        name="phi-3.5-mini-instruct", sliding_window=262_144, max_positions=131_072,
        rope_longrope=(_PHI35_SHORT, _PHI35_LONG, 4096), **_PHI3),
})
GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3")
LLAMA_LIKE_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3")
FAMILIES = GEMMA_FAMILIES + LLAMA_LIKE_FAMILIES

TINY_VOCAB = 512
# Smaller than the long default prompt (llmdiff/inputs.py), so local layers really slide.
TINY_SLIDING_WINDOW = 32
TINY_HEAD_DIMS = (32, 48, 24, 40, 56)
TINY_ORIGINAL_CONTEXT = 64  # Llama 3's original_max_position_embeddings, tiny


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
        # ... and the MLP width exactly as many times the hidden size (Phi-3's 8/3 needs a
        # multiple of 3).
        if sqrt_rounds_differently_in_bf16(hidden) and hidden * spec.mlp_dim % spec.hidden_size == 0:
            break
    else:  # pragma: no cover - the candidates above always contain a good one
        raise AssertionError(f"no tiny shape for {spec.name}")
    mlp = hidden * spec.mlp_dim // spec.hidden_size
    if spec.query_pre_attn_scalar:  # keep it as far from head_dim as in the full model
        query_pre_attn_scalar = round(spec.query_pre_attn_scalar * head_dim / spec.head_dim)
        assert query_pre_attn_scalar != head_dim, spec.name
    else:
        query_pre_attn_scalar = head_dim
    # The layer pattern: one whole period (Gemma 2: local, global; Gemma 3: five local, one
    # global), at least two layers.
    period = pattern_period(spec.attention_types)
    num_layers = max(2, period)
    attention_types = _pattern(spec.attention_types[:period], num_layers) if spec.attention_types else ()
    # DeepMind/HF embedding rows differing: keep the difference (and its sign) on top of a
    # text vocabulary of TINY_VOCAB ids (a tiny tokenizer needs that many).
    extra = (spec.hf_vocab_size or spec.vocab_size) - spec.vocab_size
    vocab = TINY_VOCAB + max(0, -extra)
    hf_vocab = vocab + extra if spec.hf_vocab_size else None
    # Llama 3's RoPE bands: a tiny original context, so that the default prompts run past it and
    # the tiny head_dim's frequencies fall on both sides of both band edges.
    llama3 = (*spec.rope_llama3[:3], TINY_ORIGINAL_CONTEXT) if spec.rope_llama3 else None
    # LongRoPE: the same tiny original context, which the short default prompt stays within and
    # the long one runs past (short factors on one, long on the other), the context extension
    # (max_positions / original, so the attention factor's) kept, and factor lists of the tiny
    # head_dim / 2 taken evenly from the published ones, first and last included.
    max_positions, longrope = 1024, None
    if spec.rope_longrope:
        short, long, original = spec.rope_longrope
        longrope = (_spread(short, head_dim // 2), _spread(long, head_dim // 2), TINY_ORIGINAL_CONTEXT)
        max_positions = TINY_ORIGINAL_CONTEXT * spec.max_positions // original
    # A window the model's context reaches slides over the long prompt; one no prompt can reach
    # (Phi-3 128k: twice the context) stays out of reach.
    if not spec.sliding_window:
        window = None
    elif spec.sliding_window < spec.max_positions:
        window = min(spec.sliding_window, TINY_SLIDING_WINDOW)
    else:
        window = spec.sliding_window * max_positions // spec.max_positions
    # A disabled window (Qwen 2.5's, as long as the context) is shrunk to slide over the long
    # prompt: it acts in no layer of the model, so only a port that applies it anyway shows it.
    disabled = min(spec.disabled_sliding_window, TINY_SLIDING_WINDOW) if spec.disabled_sliding_window else None
    return dataclasses.replace(
        spec, name=spec.name, vocab_size=vocab, hf_vocab_size=hf_vocab, hidden_size=hidden,
        num_layers=num_layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim, mlp_dim=mlp,
        query_pre_attn_scalar=query_pre_attn_scalar, attention_types=attention_types,
        sliding_window=window, disabled_sliding_window=disabled, rope_llama3=llama3, rope_longrope=longrope, max_positions=max_positions,
        # The tiny vocabulary's special ids (those of the tiny tokenizer): pad 0, eos 1, bos 2.
        pad_id=0 if spec.pad_id is not None else None, eos_id=1, bos_id=2, tiny=True,
    )


def _spread(values: tuple, n: int) -> tuple:
    """n of `values` at evenly spaced indices, the first and the last included."""
    if n == 1:
        return (values[0],)
    return tuple(values[round(j * (len(values) - 1) / (n - 1))] for j in range(n))


def pattern_period(types: tuple[str, ...]) -> int:
    """The shortest p with types[i] == types[i % p] for every layer (1 for no pattern)."""
    for p in range(1, len(types) + 1):
        if all(t == types[i % p] for i, t in enumerate(types)):
            return p
    return 1


LAYER_POINTS = ("attn_norm", "q", "k", "v", "attn_out", "post_attn_norm", "resid_mid", "mlp_norm",
                "mlp_gate", "mlp_up", "mlp_act", "mlp_out", "post_mlp_norm", "out")


def layer_points(spec: ModelSpec) -> tuple[str, ...]:
    """The per-layer points `spec` has, in forward order (post norms only where they exist)."""
    absent = {"post_attn_norm": not spec.post_attn_norm, "post_mlp_norm": not spec.post_mlp_norm}
    return tuple(p for p in LAYER_POINTS if not absent.get(p, False))


def capture_points(spec: ModelSpec) -> list[str]:
    """Canonical activation names in the order the forward pass computes them."""
    points = ["embed"]
    for i in range(spec.num_layers):
        points += [f"L{i}.{p}" for p in layer_points(spec)]
    return points + ["final_norm", "logits"]
