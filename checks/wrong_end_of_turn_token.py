from dataclasses import replace

from llmdiff.check import ALL_FAMILIES, Check
from llmdiff.tokenizer_parity import END_OF_TURN, chat_differences, describe_chat


class WrongEndOfTurnToken(Check):
    """## What it finds
    Turns end with something other than Gemma's `<end_of_turn>` (`<eos>`, `</s>`, `<|im_end|>`),
    in the chat template, or `<end_of_turn>` is not one token with the same id everywhere.

    ## Why it matters
    The model was tuned to close each turn with `<end_of_turn>` and to stop after writing it.
    Another marker makes past turns look unfinished, and a generation loop that stops on the
    wrong id runs on past the answer (or stops on EOS the model never emits in chat).

    ## How it is confirmed
    Static: the rendered conversations hold a different number of `<end_of_turn>` than the
    reference format, or `<end_of_turn>` encodes to different ids in the HF tokenizer and in
    tokenizer.model.

    ## Fix
    Close turns with `<end_of_turn>\\n` in the template and stop generation on its id (and on EOS).

    ## References
    google-deepmind/gemma `gm/text/_template.py`; Gemma instruction-tuned model cards.
    """

    code = "LD009"
    name = "wrong-end-of-turn-token"
    families = ALL_FAMILIES

    def run(self, ctx):
        tok = (ctx.details or {}).get("tokenizer")
        if not tok:
            return
        bad = chat_differences(tok, "end-of-turn")
        if bad:
            yield self.finding(replace(ctx, implementation="hf"), "chat_template",
                               f"turns do not end with {bad[0].get('end_of_turn', END_OF_TURN)}: {describe_chat(bad[0])}",
                               {"conversations": [c["name"] for c in bad], "first": bad[0]})
        eot = (tok.get("chat") or {}).get("end_of_turn_ids") or {}
        if len({tuple(v) for v in eot.values()}) > 1 or any(len(v) != 1 for v in eot.values()):
            yield self.finding(replace(ctx, implementation="hf"), "tokenizer.json",
                               f"{tok['chat'].get('end_of_turn', END_OF_TURN)} is not one shared token: {eot}",
                               {"end_of_turn_ids": eot})
