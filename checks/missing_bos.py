from dataclasses import replace

from llmdiff.check import ALL_FAMILIES, Check


class MissingBos(Check):
    """## What it finds
    The ids a user gets for a prompt do not start with `<bos>` (the spec's BOS id): the HF
    tokenizer's default `tokenizer(text)` adds none, or the chat template renders none.

    ## Why it matters
    Gemma was trained with every sequence starting with `<bos>`; without it the first positions
    see an input the model never saw and its outputs get much worse, with no error anywhere.
    A tokenizer_config.json with `add_bos_token: false`, or a chat template without
    `{{ bos_token }}`, is all it takes.

    ## How it is confirmed
    Static, from the tokens: `tokenizer("a")` against `tokenizer("a", add_special_tokens=False)`
    shows what the tokenizer adds; `apply_chat_template(..., tokenize=True)` shows what the
    template gives. The finding carries those ids.

    ## Fix
    Set `"add_bos_token": true` in tokenizer_config.json and start the chat template with
    `{{ bos_token }}`; with sentencepiece or DeepMind's tokenizer, pass `add_bos=True`.

    ## References
    google-deepmind/gemma `gm/text/_tokenizer.py` (`encode(..., add_bos=True)` for prompts);
    huggingface/transformers Gemma tokenizer, `add_bos_token` (default true).
    """

    code = "LD001"
    name = "missing-bos"
    families = ALL_FAMILIES

    def run(self, ctx):
        tok = (ctx.details or {}).get("tokenizer")
        if not tok or not getattr(ctx.spec, "add_bos", True):  # Qwen's prompts start without one
            return
        bos = tok["spec_ids"]["bos"]
        for impl in tok["implementations"]:
            if impl["name"].startswith("hf") and impl.get("available") and impl.get("adds_bos") == 0:
                yield self.finding(
                    replace(ctx, implementation=impl["name"]), "tokenizer_config.json",
                    f"{impl['name']}: tokenizer({impl['probe']!r}) gives {impl['probe_ids']}, no BOS ({bos})"
                    " at the start: prompts reach the model without <bos>",
                    {"probe": impl["probe"], "ids": impl["probe_ids"], "bos_id": bos})
        config = tok.get("config") or {}
        hf = next((i for i in tok["implementations"] if i["name"] == "hf" and i.get("available")), None)
        if config.get("add_bos_token") is False and hf and hf.get("adds_bos"):
            # The installed transformers kept tokenizer.json's post-processor; releases that
            # rebuild it from the config (4.x) drop BOS. The config is the evidence, with the ids.
            yield self.finding(
                replace(ctx, implementation="hf"), "tokenizer_config.json",
                f"tokenizer_config.json sets add_bos_token: false: transformers releases that honour it give"
                f" tokenizer({hf['probe']!r}) without BOS ({bos}); this one gives {hf['probe_ids']} only because"
                " tokenizer.json's post-processor still adds it",
                {"add_bos_token": False, "probe": hf["probe"], "ids": hf["probe_ids"],
                 "ids_without_bos": hf["probe_ids"][len(hf.get("prefix") or []):], "bos_id": bos})
        missing = [c for c in tok["chat"].get("conversations", []) if c.get("leading_bos") == 0]
        if missing:
            c = missing[0]
            yield self.finding(
                replace(ctx, implementation="hf"), "chat_template",
                f"the chat template gives no BOS ({bos}): apply_chat_template({c['name']}) starts"
                f" {c['ids'][:6]}, the reference {c['reference_ids'][:6]}",
                {"conversations": [m["name"] for m in missing], "ids": c["ids"][:16],
                 "reference_ids": c["reference_ids"][:16], "bos_id": bos})
