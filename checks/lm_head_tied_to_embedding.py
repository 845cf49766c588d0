from llmdiff.check import ALL_FAMILIES, Check


class LmHeadTiedToEmbedding(Check):
    """## What it finds
    The implementation computes logits with the input embedding although the checkpoint has
    its own output head (`lm_head.weight`, `tie_word_embeddings: false`: Llama 3.1 8B and
    70B, Qwen 2.5 7B, Mistral, Phi-3): a port that ties every model's head, as Gemma's and
    the small Llama 3.2 and Qwen ones are tied.

    ## Why it matters
    Every layer matches and only the last projection is wrong: the logits are those of
    another matrix, so the next-token distribution is nonsense while the hidden states look
    perfect.

    ## How it is confirmed
    Dynamic: the first divergent point is `logits`; re-running the oracle with
    `lm_head="embedding"` (the input table as the output projection) brings it back to the
    noise floor.

    ## Fix
    Load `lm_head.weight` and use it for the logits when `tie_word_embeddings` is false; tie
    only when the config says so.

    ## References
    meta-llama/Llama-3.1-8B config.json (`tie_word_embeddings: false`) and its `lm_head.weight`;
    huggingface/transformers `PreTrainedModel.tie_weights` (ties only with
    `tie_word_embeddings`).
    """

    code = "LD106"
    name = "lm-head-tied-to-embedding"
    families = ALL_FAMILIES
    knob = ("lm_head", "embedding")

    def applies(self, spec, dtype=None):
        return super().applies(spec, dtype) and not spec.tie_embeddings
