from llmdiff.check import AuditCheck


class TiedEmbeddingInconsistent(AuditCheck):
    """## What it finds
    The config's `tie_word_embeddings`, the presence of an `lm_head` tensor and its equality
    with the embeddings disagree: the config ties but the checkpoint holds an `lm_head` that
    differs from the embeddings, or the config unties but there is no `lm_head`, or the config
    disagrees with the model (Gemma, Llama 3.2, small Qwens tie; Llama 3.1, Qwen 2.5 7B and up,
    Qwen 3 8B and up, Mistral do not). Absent, `tie_word_embeddings` is the family's default:
    true for Gemma, false for Llama, Qwen and Mistral.

    ## Why it matters
    With tying on, transformers points `lm_head` at the embeddings and silently drops the
    stored `lm_head`: if it was trained separately, the served model is not the trained one.
    With tying off and no `lm_head`, transformers initialises one at random (a warning in a log
    nobody reads) and the model outputs noise.

    ## How it is confirmed
    Static: config.json, the tensor names, and digests of both tables' bytes computed while
    streaming (bitwise equality, not closeness).

    ## Fix
    Make them agree: set `tie_word_embeddings` to what the model was trained with; drop an
    `lm_head` equal to the embeddings, or save the untied one with `tie_word_embeddings: false`.

    ## References
    huggingface/transformers `PreTrainedModel.tie_weights`; Gemma ties input and output
    embeddings (arXiv:2403.08295, section 2).
    """

    code = "LD103"
    name = "tied-embedding-inconsistent"

    def run(self, ctx):
        from llmdiff.hf_format import config_value

        tie, present = config_value(ctx.config, ctx.family, "tie_word_embeddings")
        tie = True if tie is None else bool(tie)   # PretrainedConfig's default
        embed = next((r for r in ctx.tensors.values() if r.name.endswith("embed_tokens.weight")), None)
        head = next((r for r in ctx.tensors.values() if r.name.endswith("lm_head.weight")), None)
        incomplete = bool(ctx.files.get("unreadable"))
        where = "config.json:tie_word_embeddings"
        if ctx.spec is not None and ctx.spec.tie_embeddings != tie:
            yield self.finding(ctx, where, f"tie_word_embeddings is {tie}"
                               f"{'' if present else ' (absent: the default)'} but {ctx.spec.name} "
                               f"{'ties' if ctx.spec.tie_embeddings else 'does not tie'} its embeddings",
                               {"config": tie, "spec": ctx.spec.tie_embeddings})
            return
        if tie and head is not None and embed is not None:
            same = (head.shape == embed.shape and head.dtype == embed.dtype and head.stats and embed.stats
                    and head.stats.digest == embed.stats.digest)
            if not same:
                yield self.finding(ctx, head.name, f"tie_word_embeddings is {tie} but {head.name} differs from"
                                   f" {embed.name}: transformers will drop it and reuse the embeddings",
                                   {"lm_head": head.name, "embed": embed.name,
                                    "lm_head_digest": head.stats.digest if head.stats else None,
                                    "embed_digest": embed.stats.digest if embed.stats else None})
        if not tie and head is None and embed is not None and not incomplete:
            yield self.finding(ctx, where, "tie_word_embeddings is false but the checkpoint has no"
                               " lm_head.weight: transformers will initialise it at random",
                               {"config": tie, "lm_head": None})
