from dataclasses import replace

from llmdiff.check import ALL_FAMILIES, Check
from llmdiff.tokenizer_parity import describe_difference, differences_of_kind


class ControlTokenFromUserText(Check):
    """## What it finds
    A token written in user text (`<start_of_turn>`, `<eos>`...) becomes a control token id in one
    implementation where the model's SentencePiece model encodes it as text.

    ## Why it matters
    Control tokens are not text: the model reacts to them as structure. A user (or a scraped
    document) that writes `<end_of_turn>` or `<eos>` then ends turns or sequences, and the two
    implementations feed the model different ids for the same text. Typical causes: a marker that
    is a user-defined piece in tokenizer.model made a control symbol (or the other way around),
    or an added token marked special in tokenizer.json that the reference does not parse.
    transformers parsing its own named special tokens (`<bos>`, `<eos>`) in text is its documented
    default (`split_special_tokens=False`) and is reported as a note, not as this finding.

    ## How it is confirmed
    Static, from the tokens of the built-in corpus: the implementation's ids hold a control id
    (a CONTROL piece of tokenizer.model) more often than the reference's for the same string.

    ## Fix
    Make the markers the same kind of piece everywhere: in Gemma's tokenizer.model
    `<start_of_turn>` and `<end_of_turn>` are user-defined pieces; for untrusted text use
    `split_special_tokens=True` or `apply_chat_template(..., sanitize_control_tokens=True)`.

    ## References
    sentencepiece `ModelProto.SentencePiece.Type` (CONTROL vs USER_DEFINED);
    huggingface/transformers `split_special_tokens`.
    """

    code = "LD004"
    name = "control-token-from-user-text"
    families = ALL_FAMILIES

    def run(self, ctx):
        tok = (ctx.details or {}).get("tokenizer")
        if not tok:
            return
        for impl, found in differences_of_kind(tok, "control-token").items():
            s, d = found[0]
            yield self.finding(
                replace(ctx, implementation=impl), f"text:{s['name']}",
                f"{impl} turns text into control tokens in {len(found)} string(s): {describe_difference(s, d)}",
                {"strings": [x["name"] for x, _ in found], "first": d, "control_ids": tok["control_ids"]})
