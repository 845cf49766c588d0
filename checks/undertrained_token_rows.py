from llmdiff.check import AuditCheck

# A row whose norm is below this fraction of the table's median norm is under-trained.
RELATIVE_NORM = 0.1
SHOWN = 20
# The pad row counts as zeroed (by `nn.Embedding(padding_idx=...)`, not under-trained) at this
# fraction of the median norm or below: zero up to rounding.
ZEROED_PAD = 1e-6


class UndertrainedTokenRows(AuditCheck):
    """## What it finds
    Rows of a token table (the input embeddings or `lm_head`) whose L2 norm is far below the
    rest: under a tenth of the table's median row norm. Rows beyond the ids a text token can
    take (padding rows the spec knows about) are skipped, and so is the row of config.json's
    `pad_token_id` when it is zero: transformers builds the embeddings as
    `nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)`, which zeroes that row
    and keeps its gradient zero, by design.

    ## Why it matters
    Tokens that never occurred in training keep tiny initial rows. Llama 3's reserved special
    tokens were like this: fine-tuning with a chat template that uses them gives NaN gradients
    (their tiny rows are normalised by RMSNorm into huge values), and prompting with them gives
    nonsense. The tokens exist in the tokenizer, so nothing warns.

    ## How it is confirmed
    Static, from the weights: the audit computes every row's L2 norm while streaming the table
    and compares each with the median of the finite rows.

    ## Fix
    Do not use these tokens in prompts or templates; if a fine-tune needs them, initialise
    their rows to the mean of the trained rows first (and train the embeddings).

    ## References
    "Fishing for Magikarp: Automatically Detecting Under-trained Tokens" (arXiv:2405.05417);
    Unsloth's note on Llama 3 reserved tokens and NaN gradients.
    """

    code = "LD102"
    name = "undertrained-token-rows"

    def run(self, ctx):
        import numpy as np

        from llmdiff.audit_tokens import vocabulary
        from llmdiff.hf_format import text_config

        pad = text_config(ctx.config).get("pad_token_id")
        for rec in sorted(ctx.tensors.values(), key=lambda r: r.name):
            st = rec.stats
            if not rec.is_token_table or st is None or st.row_norms is None or st.all_zero:
                continue
            norms = st.row_norms
            if ctx.spec is not None:
                norms = norms[:ctx.spec.text_vocab_size]
            finite = np.isfinite(norms)
            if finite.sum() < 2:
                continue
            median = float(np.median(norms[finite]))
            if median <= 0:
                continue
            low = finite & (norms < RELATIVE_NORM * median)
            if isinstance(pad, int) and 0 <= pad < len(norms) and norms[pad] <= ZEROED_PAD * median:
                low[pad] = False   # zeroed by padding_idx
            low = np.flatnonzero(low)
            if not low.size:
                continue
            ids = [int(i) for i in low[:SHOWN]]
            names = {i: t for t, i in (vocabulary(ctx) or {}).items()}
            shown = ", ".join(f"{i} {names[i]!r}" if i in names else str(i) for i in ids[:5])
            yield self.finding(
                ctx, rec.name,
                f"{low.size} rows of {rec.name} have a norm under {RELATIVE_NORM} x the median"
                f" ({median:.3g}): ids {shown}{' ...' if low.size > 5 else ''}",
                {"file": rec.file, "rows": int(low.size), "ids": ids,
                 "tokens": [names.get(i) for i in ids], "median_norm": median,
                 "min_norm": float(norms[low].min()), "threshold": RELATIVE_NORM * median})
