from dataclasses import replace

from llmdiff.check import ALL_FAMILIES, Check
from llmdiff.tokenizer_parity import GENERATION_PROMPT, chat_differences, describe_chat


class GenerationPromptMismatch(Check):
    """## What it finds
    The generation prompt the chat template adds (`add_generation_prompt=True`) differs from the
    reference `<start_of_turn>model\\n`: most often the newline after `model` is missing, or the
    role is `assistant`.

    ## Why it matters
    The generation prompt is the last thing the model reads before it answers. Without the
    newline the model's first token is usually a newline of its own, or an answer conditioned
    on a header it was never tuned with; either way answers change.

    ## How it is confirmed
    Static: conversations rendered with `add_generation_prompt=True` through `apply_chat_template`
    first differ from the reference inside the trailing `<start_of_turn>model\\n`.

    ## Fix
    End the template with `{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}`.

    ## References
    google-deepmind/gemma `gm/text/_template.py`; the Gemma model cards' prompt format.
    """

    code = "LD008"
    name = "generation-prompt-mismatch"
    families = ALL_FAMILIES

    def run(self, ctx):
        tok = (ctx.details or {}).get("tokenizer")
        bad = chat_differences(tok, "generation-prompt") if tok else []
        if bad:
            yield self.finding(replace(ctx, implementation="hf"), "chat_template",
                               f"the generation prompt differs from {bad[0].get('generation_prompt', GENERATION_PROMPT)!r}:"
                               f" {describe_chat(bad[0])}",
                               {"conversations": [c["name"] for c in bad], "first": bad[0]})
