from llmdiff.check import Check


class SlidingWindowWrongLayers(Check):
    """## What it finds
    The sliding window is applied to the wrong layers: odd instead of even layers on Gemma 2, or
    the global layer of Gemma 3's five-local-one-global pattern counted from the wrong end; or no
    layer slides at all.

    ## Why it matters
    A global layer that slides loses long-range context; a local layer that does not slide sees
    tokens it never saw in training. Both only show on prompts longer than the window.

    ## How it is confirmed
    Dynamic: the first divergent point is the first layer whose attention type is wrong;
    re-running the oracle with `layer_pattern_shift=1` (or `sliding_window=False`) brings the
    candidate back to the noise floor.

    ## Fix
    Gemma 2: layer i is local when i is even. Gemma 3: layer i is global when (i + 1) % 6 == 0.
    Take the pattern from the config's `layer_types` rather than recomputing it.

    ## References
    google-deepmind/gemma `gm/nn/_gemma.py` (`attention_types`); huggingface/transformers
    `Gemma2Config.layer_types`, `Gemma3TextConfig.layer_types`.
    """

    code = "LD502"
    name = "sliding-window-wrong-layers"
    families = ("gemma2", "gemma3")
    knob = ("layer_pattern_shift", 1)

    def variants(self):
        # The window on the wrong layers, or on none: two forms of the same mistake.
        return [{"layer_pattern_shift": 1}, {"sliding_window": False}]

    def applies(self, spec, dtype=None):
        return super().applies(spec, dtype) and bool(spec.sliding_window)
