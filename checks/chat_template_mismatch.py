from dataclasses import replace

from llmdiff.check import ALL_FAMILIES, Check
from llmdiff.tokenizer_parity import chat_differences, describe_chat


class ChatTemplateMismatch(Check):
    """## What it finds
    The checkpoint's HF chat template renders a conversation differently from the family's
    reference format (roles, newlines, where a system message goes, content trimming), or the
    rendered string tokenizes to other ids, or the template raises on an ordinary conversation.

    ## Why it matters
    Instruction-tuned Gemma answers well only in the exact format it was tuned on:
    `<start_of_turn>user\\n…<end_of_turn>\\n<start_of_turn>model\\n`. A role called
    `assistant`, a missing newline or a stray space changes answers without any error.

    ## How it is confirmed
    Static: the template is rendered by transformers' own sandboxed `apply_chat_template` for
    one-turn, multi-turn and system-message conversations, with and without the generation prompt,
    and compared with the reference format as a string and as ids.

    ## Fix
    Use the chat template published with the instruction-tuned checkpoint; Gemma folds a system
    message into the first user turn (`system + "\\n\\n" + user`).

    ## References
    google-deepmind/gemma `gm/text/_template.py`; ai.google.dev Gemma formatting and system
    instructions; huggingface/transformers chat templating docs.
    """

    code = "LD007"
    name = "chat-template-mismatch"
    families = ALL_FAMILIES

    def run(self, ctx):
        tok = (ctx.details or {}).get("tokenizer")
        bad = chat_differences(tok, "template") if tok else []
        if bad:
            yield self.finding(replace(ctx, implementation="hf"), "chat_template",
                               f"{len(bad)} conversation(s) differ from the reference format: {describe_chat(bad[0])}",
                               {"conversations": [c["name"] for c in bad], "first": bad[0]})
