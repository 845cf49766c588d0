from llmdiff.check import AuditCheck

# End-of-turn tokens of the chat formats in use: Gemma, Llama 3, ChatML (Qwen...), Phi-3.
END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")


def chat_template(ctx) -> str | None:
    template = (ctx.tokenizer_config or {}).get("chat_template")
    named = isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str)
                                               for t in template)
    if named:   # named templates: [{"name": ..., "template": ...}]
        template = "\n".join(t["template"] for t in template)
    if template is not None and not isinstance(template, str):
        from llmdiff.errors import WeightsError

        raise WeightsError("tokenizer_config.json: chat_template must be a string or an array of"
                           " {name, template} objects")
    if not template and "chat_template" in ctx.files:
        from llmdiff import checkpoint_files

        raw = checkpoint_files.read_bytes(ctx.path / ctx.files["chat_template"][0], checkpoint_files.JSON_LIMIT,
                                          "chat template")
        template = raw.decode("utf-8", errors="replace")
    return template or None


class EndOfTurnMissingFromEos(AuditCheck):
    """## What it finds
    A chat model (its tokenizer has a chat template) whose template ends turns with a token
    (`<end_of_turn>`, `<|eot_id|>`, `<|im_end|>`, `<|end|>`) that is not among the EOS ids of
    generation_config.json (or config.json when there is none).

    ## Why it matters
    `generate()` stops on the EOS ids of the generation config. The instruction-tuned model
    ends its answer with the end-of-turn token; if that is not an EOS id, generation runs on,
    writing the user's next turn and answering it. Llama 3 Instruct shipped like this
    (only `<|end_of_text|>`), Gemma's instruction-tuned models list `<end_of_turn>` (107).

    ## How it is confirmed
    Static: the chat template's text (tokenizer_config.json or chat_template.jinja, never
    rendered), the token's id from tokenizer.json, and the EOS ids, all read as JSON.

    ## Fix
    Add the end-of-turn id to `eos_token_id` in generation_config.json, e.g. `[1, 107]` for
    Gemma.

    ## References
    meta-llama/Meta-Llama-3-8B-Instruct generation_config.json fix (eos_token_id [128001,
    128009]); Gemma's instruction-tuned generation_config.json.
    """

    code = "LD051"
    name = "end-of-turn-missing-from-eos"

    def run(self, ctx):
        from llmdiff.audit_tokens import id_list, vocabulary
        from llmdiff.hf_format import text_config

        template = chat_template(ctx)
        vocab = vocabulary(ctx)
        if not template or not vocab:
            return
        source = "generation_config.json" if ctx.generation_config is not None else "config.json"
        data = ctx.generation_config if ctx.generation_config is not None else text_config(ctx.config)
        eos = id_list(data.get("eos_token_id"))
        for token in END_OF_TURN:
            if token in template and token in vocab and vocab[token] not in eos:
                yield self.finding(ctx, f"{source}:eos_token_id",
                                   f"the chat template ends turns with {token} (id {vocab[token]}) but"
                                   f" {source} stops only on {eos}: generation runs past the answer",
                                   {"token": token, "token_id": vocab[token], "eos_token_id": eos, "file": source})
