from dataclasses import replace

from llmdiff.check import ALL_FAMILIES, Check
from llmdiff.tokenizer_parity import describe_difference, differences_of_kind


class TokenIdsMismatch(Check):
    """## What it finds
    Two tokenizer implementations of the same checkpoint give different ids for the same text,
    both round-tripping it: another segmentation (other merges, another vocabulary order,
    digits not split, byte fallback handled differently).

    ## Why it matters
    The model was trained on the reference segmentation; any other is out of distribution
    (numbers split differently change arithmetic, code indentation changes code). Numeric parity
    means nothing when the inputs differ.

    ## How it is confirmed
    Static, from the built-in corpus (and `--text FILE`): the first differing token, with
    context, ids on each side and the decoded round trip.

    ## Fix
    Rebuild tokenizer.json from the checkpoint's tokenizer.model with transformers' converter
    (`AutoTokenizer.from_pretrained` on a directory without tokenizer.json), or ship the one
    published with the model.

    ## References
    huggingface/transformers `convert_slow_tokenizer.GemmaConverter`.
    """

    code = "LD006"
    name = "token-ids-mismatch"
    families = ALL_FAMILIES

    def run(self, ctx):
        tok = (ctx.details or {}).get("tokenizer")
        if not tok:
            return
        for impl, found in differences_of_kind(tok, "ids").items():
            s, d = found[0]
            yield self.finding(
                replace(ctx, implementation=impl), f"text:{s['name']}",
                f"{impl} segments {len(found)} string(s) differently from {d['reference']}: {describe_difference(s, d)}",
                {"strings": [x["name"] for x, _ in found], "first": d})
