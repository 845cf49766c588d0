from llmdiff.check import AuditCheck

_SKIPPED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                     "model.multi_modal_projector.")


def _text_name(name: str) -> str | None:
    """The text model's HF name (multimodal Gemma 3 nests it), or None for vision tensors."""
    if name.startswith(_SKIPPED_PREFIXES):
        return None
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("language_model."):
        return name[len("language_model."):]
    return name


class TensorShapeMismatch(AuditCheck):
    """## What it finds
    Tensors missing from the checkpoint, tensors the architecture does not have, and tensors
    whose shape differs from what config.json implies (hidden size, heads, kv heads, head_dim,
    MLP width, layers). Row counts of token tables are `vocab-size-mismatch`'s.

    ## Why it matters
    transformers initialises missing tensors at random and drops unexpected ones, each with
    one warning line in a long log: the model loads and outputs noise. A shape that does not
    match fails at load time in one framework and is silently reshaped in another.

    ## How it is confirmed
    Static: the tensor headers against the HF layout derived from config.json's own sizes
    (`llmdiff.convert.hf_shapes`), for the families llmdiff knows.

    ## Fix
    Re-export with every tensor; make config.json describe the weights (or the weights the
    config). A converter that renames tensors must map every one.

    ## References
    huggingface/transformers `_load_pretrained_model` (missing_keys / unexpected_keys).
    """

    code = "LD703"
    name = "tensor-shape-mismatch"

    def run(self, ctx):
        from llmdiff import convert
        from llmdiff.hf_format import config_spec
        from llmdiff.errors import WeightsError

        if not ctx.files.get("safetensors") or not ctx.tensors:
            return
        spec = config_spec(ctx.config, ctx.family)
        if spec is None:
            return
        tensors = {}
        for rec in ctx.tensors.values():
            name = _text_name(rec.name)
            if name is not None:
                tensors[name] = rec
        try:
            expected = convert.hf_shapes(spec, lm_head="lm_head.weight" in tensors)
        except WeightsError:
            return
        missing = sorted(set(expected) - set(tensors))
        if missing and not ctx.files.get("unreadable"):
            yield self.finding(ctx, missing[0], f"{len(missing)} tensors missing, first {missing[0]}"
                               f" {list(expected[missing[0]])}", {"missing": missing[:50], "count": len(missing)})
        extra = sorted(set(tensors) - set(expected))
        if extra:
            yield self.finding(ctx, extra[0], f"{len(extra)} tensors the {spec.family} architecture does not"
                               f" have, first {extra[0]}", {"unexpected": extra[:50], "count": len(extra)})
        wrong = []
        for name in sorted(set(expected) & set(tensors)):
            got, want = tuple(tensors[name].shape), tuple(expected[name])
            if tensors[name].is_token_table and len(got) == 2:
                got, want = got[1:], want[1:]
            if got != want:
                wrong.append((name, list(tensors[name].shape), list(expected[name])))
        if wrong:
            name, got, want = wrong[0]
            yield self.finding(ctx, name, f"{len(wrong)} tensors have shapes config.json does not imply;"
                               f" first {name} {got}, expected {want}",
                               {"mismatches": [{"tensor": n, "shape": g, "expected": w} for n, g, w in wrong[:50]]})
