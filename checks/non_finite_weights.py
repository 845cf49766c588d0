from llmdiff.check import AuditCheck


class NonFiniteWeights(AuditCheck):
    """## What it finds
    Tensors of the checkpoint that hold NaN or infinite values.

    ## Why it matters
    One NaN in a weight makes every activation it touches NaN: the model outputs garbage or
    NaN logits, and fine-tuning diverges at the first step. It happens when a training run
    blew up before the checkpoint was saved, or when a conversion overflowed (float32 values
    above 65504 cast to float16 become Inf).

    ## How it is confirmed
    Static, from the weights: the audit streams every tensor once and counts the values whose
    exponent bits are all ones (NaN or Inf), and records the first one's index.

    ## Fix
    Re-export the checkpoint from the last healthy training step; when converting, cast to a
    dtype whose range holds the values (bfloat16 rather than float16).

    ## References
    IEEE 754 encodings; huggingface/transformers issues on float16 overflow in Gemma and T5.
    """

    code = "LD701"
    name = "non-finite-weights"

    def run(self, ctx):
        for rec in sorted(ctx.tensors.values(), key=lambda r: r.name):
            st = rec.stats
            if st is not None and (st.nan or st.inf):
                yield self.finding(
                    ctx, rec.name,
                    f"{rec.name} holds {st.nan} NaN and {st.inf} Inf values (first at index {st.first_nonfinite})",
                    {"file": rec.file, "nan": st.nan, "inf": st.inf, "first_index": st.first_nonfinite,
                     "shape": list(rec.shape)})
