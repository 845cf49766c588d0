from llmdiff.check import AuditCheck


class AllZeroTensor(AuditCheck):
    """## What it finds
    Tensors whose every value is zero.

    ## Why it matters
    A trained weight is never exactly zero everywhere: an all-zero projection kills its branch
    (attention or MLP output is 0), an all-zero embedding table makes every token the same.
    It is what a failed shard merge, a conversion that wrote a freshly initialised module, or a
    checkpoint saved from a meta-device model look like. (Gemma stores norm scales as offsets,
    `(1 + w)`: an all-zero scale is an untouched initialisation, also worth a look.)

    ## How it is confirmed
    Static, from the weights: the largest magnitude seen while streaming the tensor is 0.

    ## Fix
    Re-export the checkpoint; check that the conversion script maps every source tensor and
    that the model was materialised (not on the meta device) when it was saved.

    ## References
    huggingface/transformers `save_pretrained` with `device_map="meta"` writes empty weights.
    """

    code = "LD702"
    name = "all-zero-tensor"

    def run(self, ctx):
        for rec in sorted(ctx.tensors.values(), key=lambda r: r.name):
            st = rec.stats
            if st is not None and rec.nbytes and st.all_zero:
                yield self.finding(ctx, rec.name, f"{rec.name} {list(rec.shape)} is all zeros",
                                   {"file": rec.file, "shape": list(rec.shape), "dtype": rec.dtype})
