from llmdiff.check import ConfigCheck


class ConfigQueryScaleMismatch(ConfigCheck):
    """## What it finds
    `query_pre_attn_scalar` (queries are multiplied by its -1/2 power) differs from the
    model's: Gemma 2 27B and Gemma 3 27B scale by (hidden / heads) = 144 and 168, not by
    head_dim 128; the other sizes by head_dim (256).

    ## Why it matters
    The scale sets the temperature of every attention softmax. The 27B models with 1/sqrt(128)
    instead of 1/sqrt(144) have attention that is too sharp everywhere: plausible text, worse
    scores, no error.

    ## How it is confirmed
    Static: config.json (absent: transformers' default 256) against the spec's
    `query_pre_attn_scalar` (or its head_dim).

    ## Fix
    Set `query_pre_attn_scalar` to the spec's value (144 for gemma-2-27b, 168 for gemma-3-27b,
    head_dim otherwise).

    ## References
    huggingface/transformers Gemma 2 27B fix (`query_pre_attn_scalar=144`); google-deepmind/gemma
    `QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS`.
    """

    code = "LD710"
    name = "config-query-scale-mismatch"
    families = ("gemma2", "gemma3")

    def check(self, ctx, spec):
        want = spec.query_pre_attn_scalar or spec.head_dim
        value, present = self.value(ctx, "query_pre_attn_scalar")
        if value is None or float(value) != float(want):
            yield self.differs(ctx, "query_pre_attn_scalar", value, present, want,
                               uses=f"scales queries by {want:g} ** -0.5")
