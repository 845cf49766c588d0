from llmdiff.check import Check


class LongropeAttentionFactorMissing(Check):
    """## What it finds
    LongRoPE (Phi-3 128k, Phi-3.5 mini) without its attention factor: cos and sin not
    multiplied by sqrt(1 + ln(s) / ln(original)), s = max_position_embeddings /
    original_max_position_embeddings (1.19 for 131072 / 4096), as if LongRoPE were only a
    per-frequency rescaling.

    ## Why it matters
    The factor scales q and k after RoPE, so every attention logit by its square (1.417 on the
    128k models): attention is flatter than in training on every prompt, short ones included,
    and no error is raised.

    ## How it is confirmed
    Dynamic: the first divergent point is layer 0's `q` / `k` on every prompt; re-running the
    oracle with `longrope_attention_factor=False` brings it back to the noise floor.

    ## Fix
    Multiply cos and sin (or q and k after RoPE) by the factor, for the short and the long
    factors alike: Phi-3's `scaling_factor`, transformers' `attention_factor` (`rope_scaling`'s
    `attention_factor` when set, else computed from `factor` or max_position_embeddings /
    original_max_position_embeddings).

    ## References
    microsoft/Phi-3-mini-128k-instruct `modeling_phi3.py` (`Phi3LongRoPEScaledRotaryEmbedding`);
    huggingface/transformers `modeling_rope_utils._compute_longrope_parameters`; LongRoPE
    (arXiv:2402.13753).
    """

    code = "LD408"
    name = "longrope-attention-factor-missing"
    families = ("phi3",)
    knob = ("longrope_attention_factor", False)

    def applies(self, spec, dtype=None):
        return super().applies(spec, dtype) and spec.rope_longrope is not None
