from llmdiff.check import ALL_FAMILIES, Check


class QueryScaleWrong(Check):
    """## What it finds
    Queries are scaled by head_dim ** -0.5 where the model uses `query_pre_attn_scalar ** -0.5`
    (Gemma 2 27B: 144 = hidden / heads; Gemma 3 27B: 168), or by (hidden / heads) ** -0.5 where
    head_dim differs from hidden / heads (Gemma 7B: 256, not 3072 / 16 = 192).

    ## Why it matters
    The attention temperature is wrong in every layer; with 27B's scalar the logits are
    off by a factor sqrt(256 / 144) = 1.33.

    ## How it is confirmed
    Dynamic: the first divergent point is layer 0's `attn_out` (q, k, v agree: the scale is applied
    after capture); re-running the oracle with `query_scale="head_dim"` (or
    `"hidden_over_heads"`) brings it back to the noise floor.

    ## Fix
    Set `query_pre_attn_scalar` in the config from the model card and use it:
    `scaling = config.query_pre_attn_scalar ** -0.5`.

    ## References
    google-deepmind/gemma `gm/nn/_config.py` (`QueryPreAttentionNormalisation`);
    huggingface/transformers `Gemma2Config.query_pre_attn_scalar`.
    """

    code = "LD504"
    name = "query-scale-wrong"
    families = ALL_FAMILIES
    knob = ("query_scale", "head_dim")

    def variants(self):
        return [{"query_scale": v} for v in ("head_dim", "hidden_over_heads")]

    def applies(self, spec, dtype=None):
        scalar = spec.query_pre_attn_scalar or spec.head_dim
        wrong = {spec.head_dim, spec.hidden_size // spec.num_heads}
        return super().applies(spec, dtype) and wrong != {scalar}
