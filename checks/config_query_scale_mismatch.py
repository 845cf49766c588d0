from llmdiff.check import Check


class ConfigQueryScaleMismatch(Check):
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
    target = "checkpoint"
    families = ("gemma2", "gemma3")

    def run(self, ctx):
        from llmdiff.audit import config_value, shown

        spec = ctx.spec
        if spec is None or spec.family not in self.families:
            return
        want = spec.query_pre_attn_scalar or spec.head_dim
        value, present = config_value(ctx, "query_pre_attn_scalar")
        if value is None or float(value) != float(want):
            yield self.finding(ctx, "config.json:query_pre_attn_scalar",
                               f"query_pre_attn_scalar is {shown(value, present)} but {spec.name} scales"
                               f" queries by {want:g} ** -0.5", {"config": value, "spec": want})
