from llmdiff.check import ALL_FAMILIES, Check


class LmHeadUntied(Check):
    """## What it finds
    The implementation's output projection (`lm_head`) is not the input embedding, although the
    model ties them (every Gemma does; so do Llama 3.2 1B/3B and the small Qwen models).

    ## Why it matters
    A checkpoint converted with a separate `lm_head` (copied, re-initialised, or left random when
    `tie_word_embeddings` was false) gives different logits with no other symptom: every layer
    matches and only the last projection is wrong. Fine-tuning then updates two tables that
    should be one.

    ## How it is confirmed
    Static, from the implementation itself: after loading, its output embedding is neither the
    same tensor as its input embedding nor equal to it. The evidence gives the largest
    difference between the two tables.

    ## Fix
    Set `tie_word_embeddings: true` in config.json and drop `lm_head.weight` from the checkpoint
    (or call `model.tie_weights()` after loading).

    ## References
    huggingface/transformers `PreTrainedModel.tie_weights`; google-deepmind/gemma
    `Embedder.decode` (the output projection is the input table).
    """

    code = "LD105"
    name = "lm-head-untied"
    families = ALL_FAMILIES   # Llama 3.2 1B/3B, Qwen 2.5 0.5B-3B and Qwen3 0.6B-4B tie theirs too

    def run(self, ctx):
        if ctx.spec.tie_embeddings and ctx.details.get("tied_lm_head") is False:
            yield self.finding(ctx, "logits", "the output projection is not the input embedding, though "
                               f"{ctx.spec.name} ties them",
                               {"tied_lm_head": False, "max_abs_diff": ctx.details.get("lm_head_max_abs_diff")})
