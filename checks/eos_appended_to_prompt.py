from dataclasses import replace

from llmdiff.check import ALL_FAMILIES, Check


class EosAppendedToPrompt(Check):
    """## What it finds
    The HF tokenizer's default `tokenizer(text)` appends `<eos>` to every prompt.

    ## Why it matters
    A prompt that ends in EOS tells the model the text is over: generation starts after an
    end-of-sequence it was never meant to see, and scores of the last position are wrong.
    `add_eos_token: true` in tokenizer_config.json (right for some fine-tuning recipes) does it.

    ## How it is confirmed
    Static, from the tokens: `tokenizer("a")` against `tokenizer("a", add_special_tokens=False)`.

    ## Fix
    Set `"add_eos_token": false` in tokenizer_config.json; add EOS only to training targets.

    ## References
    huggingface/transformers Gemma tokenizer, `add_eos_token` (default false).
    """

    code = "LD003"
    name = "eos-appended-to-prompt"
    families = ALL_FAMILIES

    def run(self, ctx):
        tok = (ctx.details or {}).get("tokenizer")
        if not tok:
            return
        hf = next((i for i in tok["implementations"] if i["name"] == "hf" and i.get("available")), None)
        if (tok.get("config") or {}).get("add_eos_token") is True and hf and not hf.get("adds_eos"):
            yield self.finding(
                replace(ctx, implementation="hf"), "tokenizer_config.json",
                f"tokenizer_config.json sets add_eos_token: true: transformers releases that honour it append EOS"
                f" ({tok['spec_ids']['eos']}) to every prompt; this one gives {hf['probe_ids']}",
                {"add_eos_token": True, "probe": hf["probe"], "ids": hf["probe_ids"],
                 "ids_with_eos": hf["probe_ids"] + [tok["spec_ids"]["eos"]], "eos_id": tok["spec_ids"]["eos"]})
        for impl in tok["implementations"]:
            if impl.get("available") and impl.get("adds_eos"):
                yield self.finding(
                    replace(ctx, implementation=impl["name"]), "tokenizer_config.json",
                    f"{impl['name']}: tokenizer({impl['probe']!r}) gives {impl['probe_ids']}, ending in EOS"
                    f" ({tok['spec_ids']['eos']})",
                    {"probe": impl["probe"], "ids": impl["probe_ids"], "eos_id": tok["spec_ids"]["eos"]})
