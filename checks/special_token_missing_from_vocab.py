from llmdiff.check import AuditCheck

_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class SpecialTokenMissingFromVocab(AuditCheck):
    """## What it finds
    Special tokens named in tokenizer_config.json or special_tokens_map.json (`bos_token`,
    `eos_token`, `pad_token`, `unk_token`, `additional_special_tokens`) that are not in the
    vocabulary of tokenizer.json (model vocab plus added tokens).

    ## Why it matters
    A special token the vocabulary lacks is tokenized as text: `<end_of_turn>` becomes five
    ordinary pieces, the template's structure is lost, and the token can never be generated,
    so a model that should stop on it never does. Loaders may also add it as a new token with
    an untrained (random or zero) embedding row.

    ## How it is confirmed
    Static: the token strings against tokenizer.json (and tokenizer_config.json's
    `added_tokens_decoder`), read as JSON; no tokenizer library is needed.

    ## Fix
    Name the tokens the vocabulary really has (check spelling, e.g. `<end_of_turn>` vs
    `<end-of-turn>`), or add them to the tokenizer and resize and train the embeddings.

    ## References
    huggingface/tokenizers `added_tokens`; transformers `SpecialTokensMixin`.
    """

    code = "LD052"
    name = "special-token-missing-from-vocab"

    def run(self, ctx):
        from llmdiff.audit_tokens import token_string, vocabulary

        vocab = vocabulary(ctx)
        if not vocab:
            return
        missing: dict[str, list[str]] = {}
        for source, data in (("tokenizer_config.json", ctx.tokenizer_config),
                             ("special_tokens_map.json", ctx.special_tokens_map)):
            if not isinstance(data, dict):
                continue
            named = [(k, token_string(data.get(k))) for k in _KEYS]
            extra = data.get("additional_special_tokens") or []
            if not isinstance(extra, list):   # a string would be read as its characters
                from llmdiff.errors import WeightsError

                raise WeightsError(f"{source}: additional_special_tokens must be an array,"
                                   f" found {type(extra).__name__}")
            named += [("additional_special_tokens", token_string(t)) for t in extra]
            for key, token in named:
                if token is not None and token not in vocab and token not in missing:
                    missing[token] = [f"{source}:{key}"]
                elif token in missing and f"{source}:{key}" not in missing[token]:
                    missing[token].append(f"{source}:{key}")
        for token, where in missing.items():
            yield self.finding(ctx, where[0], f"special token {token!r} ({', '.join(where)}) is not in the"
                               " vocabulary: it is tokenized as text and can never be generated",
                               {"token": token, "named_in": where})
