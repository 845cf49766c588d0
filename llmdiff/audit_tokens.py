"""What a checkpoint's tokenizer files say, as the audit checks read it: the vocabulary
(tokenizer.json's model vocab and added tokens, tokenizer_config.json's `added_tokens_decoder`),
a special token as tokenizer_config.json writes it, and a token id field as a list. Ids of the
wrong JSON type make the tokenizer unloadable: one line naming the field (exit 2).
"""

from __future__ import annotations

from llmdiff.check import AuditContext
from llmdiff.errors import WeightsError
from llmdiff.hf_format import is_int, json_kind


def token_string(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def vocabulary(ctx: AuditContext) -> dict[str, int] | None:
    """token -> id from tokenizer.json (model vocab and added tokens) and tokenizer_config.json's
    `added_tokens_decoder`; None when neither file gives one."""
    if "vocabulary" in ctx.notes:
        return ctx.notes["vocabulary"]
    vocab: dict[str, int] | None = None
    tok = ctx.tokenizer if isinstance(ctx.tokenizer, dict) else None
    # Ids of the wrong JSON type make the tokenizer unloadable: one line naming the field.
    if tok is not None:
        vocab = {}
        model = tok.get("model")
        if model is not None and not isinstance(model, dict):
            raise WeightsError(f"tokenizer.json: model must be an object, found {json_kind(model)}")
        model_vocab = (model or {}).get("vocab")
        if isinstance(model_vocab, dict):
            bad = next((k for k, v in model_vocab.items() if not is_int(v)), None)
            if bad is not None:
                raise WeightsError(f"tokenizer.json: model.vocab[{bad!r}] must be an integer id,"
                                   f" found {json_kind(model_vocab[bad])}")
            vocab.update(model_vocab)
        elif isinstance(model_vocab, list):  # Unigram: [[piece, score], ...]
            vocab.update({item[0]: i for i, item in enumerate(model_vocab)
                          if isinstance(item, list) and item and isinstance(item[0], str)})
        added_tokens = tok.get("added_tokens") or []
        if not isinstance(added_tokens, list):
            raise WeightsError(f"tokenizer.json: added_tokens must be an array, found {json_kind(added_tokens)}")
        for added in added_tokens:
            if isinstance(added, dict) and "content" in added and "id" in added:
                if not (isinstance(added["content"], str) and is_int(added["id"])):
                    raise WeightsError("tokenizer.json: added_tokens entries need a string content and an"
                                       f" integer id, found {added['content']!r:.40} with id {added['id']!r:.20}")
                vocab[added["content"]] = added["id"]
    decoder = (ctx.tokenizer_config or {}).get("added_tokens_decoder")
    if isinstance(decoder, dict):
        vocab = vocab if vocab is not None else {}
        for i, added in decoder.items():
            content = token_string(added)
            if content is not None:
                try:
                    vocab.setdefault(content, int(i))
                except ValueError:
                    raise WeightsError(f"tokenizer_config.json: added_tokens_decoder key {i!r:.40} is not a"
                                       " token id") from None
    ctx.notes["vocabulary"] = vocab
    return vocab


def id_list(value) -> list[int]:
    """A token id field (`eos_token_id`: an id or a list of ids) as a list of its integer ids."""
    if value is None:
        return []
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int)]
    return [int(value)] if isinstance(value, int) else []


__all__ = ["id_list", "token_string", "vocabulary"]
