from llmdiff.check import ALL_FAMILIES, Check


class KvHeadRepeatOrder(Check):
    """## What it finds
    Grouped-query attention maps query heads to kv heads in the wrong order: head n reads kv
    head n % K (tiled) instead of n // G (grouped).

    ## Why it matters
    `kv.repeat(1, G, 1, 1)` and `repeat_interleave(kv, G, dim=1)` look interchangeable and are
    not: with the wrong one, most query heads attend with another head's keys and values.
    Models with one kv head, or one per query head, are immune, so the bug survives tests on
    them.

    ## How it is confirmed
    Dynamic: the first divergent point is layer 0's `attn_out` (q, k, v agree); re-running the
    oracle with `kv_repeat="tiled"` brings it back to the noise floor.

    ## Fix
    Repeat each kv head G times in place: `repeat_interleave(kv, G, dim=heads)` (HF's
    `repeat_kv`), or reshape queries to (K, G) as DeepMind does.

    ## References
    huggingface/transformers `repeat_kv`; google-deepmind/gemma `gm/nn/_modules.py` (`use_gqa`).
    """

    code = "LD506"
    name = "kv-head-repeat-order"
    families = ALL_FAMILIES
    knob = ("kv_repeat", "tiled")

    def applies(self, spec, dtype=None):
        return super().applies(spec, dtype) and spec.num_kv_heads > 1 and spec.kv_groups > 1
