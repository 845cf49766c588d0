from llmdiff.check import AuditCheck


class SpecialTokenIdMismatch(AuditCheck):
    """## What it finds
    The ids of `<bos>`, `<eos>` and `<pad>` disagree: config.json / generation_config.json's
    `bos_token_id`, `eos_token_id`, `pad_token_id` against the model's (spec) and against the
    ids tokenizer.json gives the token strings of tokenizer_config.json. (A pad that equals
    EOS is `pad-token-is-eos`'s.)

    ## Why it matters
    Gemma must start with `<bos>` (id 2): without it, or with another id, outputs degrade
    badly. A generation config that stops on the wrong id never stops, or stops at once; a
    pad id that is a real token leaks into attention when masks are built from ids.

    ## How it is confirmed
    Static: the JSON files' ids, the spec's `bos_id`, `eos_id`, `pad_id`, and the tokenizer's
    vocabulary.

    ## Fix
    Make every file give each special token the same id, the one the tokenizer assigns to it
    (Gemma: pad 0, eos 1, bos 2).

    ## References
    Gemma's tokenizer and config.json; huggingface/transformers `GenerationConfig`.
    """

    code = "LD053"
    name = "special-token-id-mismatch"

    def run(self, ctx):
        from llmdiff.audit_tokens import id_list, token_string, vocabulary
        from llmdiff.hf_format import text_config

        vocab = vocabulary(ctx) or {}
        tc = ctx.tokenizer_config or {}
        eos_all = set()
        for data in (ctx.generation_config, text_config(ctx.config)):
            eos_all.update(id_list((data or {}).get("eos_token_id")))
        for key in ("bos", "eos", "pad"):
            spec_id = getattr(ctx.spec, f"{key}_id", None) if ctx.spec is not None else None
            token = token_string(tc.get(f"{key}_token"))
            token_id = vocab.get(token) if token is not None else None
            for source, data in (("config.json", text_config(ctx.config)),
                                 ("generation_config.json", ctx.generation_config)):
                if not isinstance(data, dict) or data.get(f"{key}_token_id") is None:
                    continue
                ids = id_list(data.get(f"{key}_token_id"))
                if key == "pad" and (set(ids) & eos_all or token_id in eos_all):
                    continue   # pad-token-is-eos
                where = f"{source}:{key}_token_id"
                if spec_id is not None and spec_id not in ids:
                    yield self.finding(ctx, where, f"{key}_token_id is {data.get(f'{key}_token_id')} but"
                                       f" {ctx.spec.name}'s {key} id is {spec_id}",
                                       {"config": ids, "spec": spec_id, "file": source})
                elif token_id is not None and token_id not in ids:
                    yield self.finding(ctx, where, f"{key}_token_id is {data.get(f'{key}_token_id')} but the"
                                       f" tokenizer's {key}_token {token!r} has id {token_id}",
                                       {"config": ids, "tokenizer": token_id, "token": token, "file": source})
