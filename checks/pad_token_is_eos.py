from llmdiff.check import AuditCheck


def special_ids(ctx, key: str) -> list[int]:
    """`{key}_token_id` from generation_config.json and config.json (either may be a list)."""
    from llmdiff.audit_tokens import id_list
    from llmdiff.hf_format import text_config

    out = []
    for data in (ctx.generation_config, text_config(ctx.config)):
        for i in id_list((data or {}).get(f"{key}_token_id")):
            if i not in out:
                out.append(i)
    return out


class PadTokenIsEos(AuditCheck):
    """## What it finds
    The padding token is the end-of-sequence token: `pad_token_id` equals (one of) the
    `eos_token_id`s, or tokenizer_config.json's `pad_token` is its `eos_token`.

    ## Why it matters
    Fine-tuning masks padding out of the loss; when padding is EOS, every real EOS is masked
    too, the model never learns to stop, and the fine-tune generates until max_length. It is
    the usual `tokenizer.pad_token = tokenizer.eos_token` recipe, saved into the release.

    ## How it is confirmed
    Static: the ids in config.json and generation_config.json, and the token strings in
    tokenizer_config.json, read as JSON.

    ## Fix
    Use a dedicated padding token (Gemma has `<pad>`, id 0); if one must be added, resize the
    embeddings and mask it with the attention mask.

    ## References
    huggingface/transformers issues on fine-tunes that never stop (pad_token = eos_token);
    Gemma's tokenizer: `<pad>` 0, `<eos>` 1.
    """

    code = "LD050"
    name = "pad-token-is-eos"

    def run(self, ctx):
        from llmdiff.audit_tokens import token_string, vocabulary

        pads, eos = special_ids(ctx, "pad"), special_ids(ctx, "eos")
        same = sorted(set(pads) & set(eos))
        if same:
            yield self.finding(ctx, "config.json:pad_token_id", f"pad_token_id {same[0]} is an eos_token_id"
                               f" ({eos}): padding masks every EOS out of a fine-tune's loss",
                               {"pad_token_id": pads, "eos_token_id": eos})
            return
        tc = ctx.tokenizer_config or {}
        pad, end = token_string(tc.get("pad_token")), token_string(tc.get("eos_token"))
        vocab = vocabulary(ctx) or {}
        if pad is not None and (pad == end or (pad in vocab and vocab[pad] in eos)):
            yield self.finding(ctx, "tokenizer_config.json:pad_token", f"pad_token {pad!r} is the end-of-sequence"
                               " token: padding masks every EOS out of a fine-tune's loss",
                               {"pad_token": pad, "eos_token": end, "eos_token_id": eos})
