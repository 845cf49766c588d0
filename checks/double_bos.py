from dataclasses import replace

from llmdiff.check import ALL_FAMILIES, Check


class DoubleBos(Check):
    """## What it finds
    The ids a user gets start with `<bos>` twice: the chat template writes `{{ bos_token }}`
    and the tokenizer (or the template a second time) adds another.

    ## Why it matters
    A second BOS shifts every position by one and puts a token the model only ever saw at
    position 0 at position 1; answers change without any error. The classic case:
    `tokenizer(tokenizer.apply_chat_template(chat, tokenize=False))`, whose rendered `<bos>`
    and the tokenizer's own both survive.

    ## How it is confirmed
    Static, from the tokens: `tokenizer("a")` and `apply_chat_template(..., tokenize=True)`
    are counted for leading BOS ids.

    ## Fix
    Let one party add BOS: keep `{{ bos_token }}` in the template and tokenize rendered chats
    with `add_special_tokens=False` (what `apply_chat_template(tokenize=True)` does).

    ## References
    huggingface/transformers chat templating docs ("templates already include special
    tokens"); google-deepmind/gemma `gm/text/_template.py`; vllm-project/vllm issue 27486 and
    PR 16976 (Llama 3's rendered `<|begin_of_text|>` plus the tokenizer's own).
    """

    code = "LD002"
    name = "double-bos"
    families = ALL_FAMILIES

    def run(self, ctx):
        tok = (ctx.details or {}).get("tokenizer")
        if not tok:
            return
        bos = tok["spec_ids"]["bos"]
        for impl in tok["implementations"]:
            if impl.get("available") and (impl.get("adds_bos") or 0) >= 2:
                yield self.finding(
                    replace(ctx, implementation=impl["name"]), "tokenizer.json",
                    f"{impl['name']}: tokenizer({impl['probe']!r}) gives {impl['probe_ids']}:"
                    f" {impl['adds_bos']} BOS ids ({bos}) before the text",
                    {"probe": impl["probe"], "ids": impl["probe_ids"], "bos_id": bos})
        doubled = [c for c in tok["chat"].get("conversations", []) if (c.get("leading_bos") or 0) >= 2]
        if doubled:
            c = doubled[0]
            yield self.finding(
                replace(ctx, implementation="hf"), "chat_template",
                f"apply_chat_template({c['name']}) starts {c['ids'][:6]}: {c['leading_bos']} BOS ids ({bos}),"
                f" the reference starts {c['reference_ids'][:6]}",
                {"conversations": [m["name"] for m in doubled], "ids": c["ids"][:16],
                 "reference_ids": c["reference_ids"][:16], "rendered": c["rendered"][:80], "bos_id": bos})
