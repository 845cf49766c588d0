from dataclasses import replace

from llmdiff.check import ALL_FAMILIES, Check
from llmdiff.tokenizer_parity import describe_difference, differences_of_kind


class TextNormalizationMismatch(Check):
    """## What it finds
    One implementation normalises text the reference keeps as written: runs of spaces collapsed,
    leading or trailing whitespace stripped, `\\r\\n` changed, NFKC applied (full-width letters,
    ligatures) or a dummy-prefix space added.

    ## Why it matters
    Gemma's tokenizer.model keeps every character (no normalisation, whitespace pieces, byte
    fallback). A port that normalises produces other ids for code, indented text, CJK and
    full-width input, and cannot round-trip them: the model sees text it was not given.

    ## How it is confirmed
    Static, from the built-in corpus of whitespace and Unicode traps: ids differ and the
    implementation's decoded text no longer equals the input (or differs from the reference's
    decoding on a string that normalisation changes).

    ## Fix
    Use the checkpoint's own normaliser: for Gemma, tokenizer.json's normalizer is only
    `Replace(" ", "▁")`; SentencePiece with `normalization_rule_name: identity`,
    `remove_extra_whitespaces: false`, `add_dummy_prefix: false`.

    ## References
    sentencepiece `NormalizerSpec`; huggingface/transformers `GemmaConverter.normalizer`.
    """

    code = "LD005"
    name = "text-normalization-mismatch"
    families = ALL_FAMILIES

    def run(self, ctx):
        tok = (ctx.details or {}).get("tokenizer")
        if not tok:
            return
        for impl, found in differences_of_kind(tok, "normalization").items():
            s, d = found[0]
            yield self.finding(
                replace(ctx, implementation=impl), f"text:{s['name']}",
                f"{impl} normalises text the reference keeps, in {len(found)} string(s): {describe_difference(s, d)};"
                f" decodes to {s['decoded'][impl]!r}",
                {"strings": [x["name"] for x, _ in found], "first": d, "text": s["text"],
                 "decoded": s["decoded"]})
