from llmdiff.check import AuditCheck


class VocabSizeMismatch(AuditCheck):
    """## What it finds
    `vocab_size` in config.json differs from the rows of the embedding table or `lm_head`, from
    the family's spec, or is smaller than the ids the tokenizer produces.

    ## Why it matters
    transformers builds the embedding from `vocab_size`: a checkpoint with more or fewer rows
    fails to load, or (with `ignore_mismatched_sizes`) loads a random table. A tokenizer id at
    or beyond the table's rows indexes out of bounds: a CUDA device-side assert, or on some
    backends a silent read of other memory.

    ## How it is confirmed
    Static: config.json, the tensor headers, the spec, and the largest id of tokenizer.json.

    ## Fix
    Set `vocab_size` to the table's rows; resize the embeddings (`resize_token_embeddings`)
    after adding tokens, before saving.

    ## References
    huggingface/transformers `PreTrainedModel.resize_token_embeddings`; Gemma 2's HF table has
    256000 rows where DeepMind's has 256128 (llmdiff.spec).
    """

    code = "LD104"
    name = "vocab-size-mismatch"

    def run(self, ctx):
        from llmdiff.audit_tokens import vocabulary
        from llmdiff.hf_format import text_config

        vocab = text_config(ctx.config).get("vocab_size")
        if not isinstance(vocab, int):
            return
        for rec in sorted(ctx.tensors.values(), key=lambda r: r.name):
            if rec.is_token_table and rec.shape[0] != vocab:
                yield self.finding(ctx, rec.name, f"vocab_size is {vocab} but {rec.name} has {rec.shape[0]} rows",
                                   {"vocab_size": vocab, "rows": rec.shape[0], "file": rec.file})
        if ctx.spec is not None:
            want = ctx.spec.hf_vocab_size or ctx.spec.vocab_size
            if vocab != want:
                yield self.finding(ctx, "config.json:vocab_size",
                                   f"vocab_size is {vocab} but {ctx.spec.name} has {want}",
                                   {"vocab_size": vocab, "spec": want})
        ids = vocabulary(ctx)
        if ids:
            top = max(ids.values())
            if top >= vocab:
                token = next(t for t, i in ids.items() if i == top)
                yield self.finding(ctx, "tokenizer.json", f"the tokenizer has id {top} ({token!r}) but"
                                   f" vocab_size is {vocab}: it indexes past the embedding table",
                                   {"max_id": top, "vocab_size": vocab})
