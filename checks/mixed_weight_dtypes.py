from llmdiff.check import AuditCheck

_CONFIG_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}


class MixedWeightDtypes(AuditCheck):
    """## What it finds
    Floating-point tensors stored in more than one dtype, or in a dtype other than the
    config's `torch_dtype` (`dtype` in newer configs).

    ## Why it matters
    A checkpoint half in float32 and half in bfloat16 is the trace of a partial conversion or
    of layers kept in float32 by a training framework; loaded with `torch_dtype="auto"` the
    model runs in the config's dtype and the float32 tensors are rounded silently, or it runs
    layers in different dtypes. A float16 export of a bfloat16 model may overflow.

    ## How it is confirmed
    Static: the dtypes in the safetensors headers against each other and config.json.

    ## Fix
    Save every floating-point tensor in the one dtype the model was trained in, and write that
    dtype in config.json.

    ## References
    huggingface/transformers `from_pretrained(torch_dtype="auto")` reads `torch_dtype`.
    """

    code = "LD704"
    name = "mixed-weight-dtypes"

    def run(self, ctx):
        from llmdiff.hf_format import text_config

        counts: dict[str, list[str]] = {}
        for rec in sorted(ctx.tensors.values(), key=lambda r: r.name):
            if rec.dtype in ("BF16", "F16", "F32", "F64"):
                counts.setdefault(rec.dtype, []).append(rec.name)
        if not counts:
            return
        if len(counts) > 1:
            main = max(counts, key=lambda d: len(counts[d]))
            other = sorted(d for d in counts if d != main)
            yield self.finding(ctx, counts[other[0]][0],
                               f"tensors in {len(counts)} float dtypes: {len(counts[main])} {main}, "
                               + ", ".join(f"{len(counts[d])} {d} (first {counts[d][0]})" for d in other),
                               {d: len(v) for d, v in counts.items()})
            return
        cfg = text_config(ctx.config)
        declared = cfg.get("torch_dtype") or cfg.get("dtype")
        stored = next(iter(counts))
        if isinstance(declared, str) and _CONFIG_DTYPES.get(declared) not in (None, stored):
            yield self.finding(ctx, "config.json:torch_dtype",
                               f"config.json says {declared} but every tensor is stored as {stored}",
                               {"config": declared, "stored": stored})
