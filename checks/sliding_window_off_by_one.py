from llmdiff.check import Check


class SlidingWindowOffByOne(Check):
    """## What it finds
    Local (sliding-window) layers let one key too many, or one too few, into each query's window.

    ## Why it matters
    A query at position t must see keys s with t - s < window. Writing `<=` (or a mask built
    from `window - 1`) changes every local layer's output once the prompt is longer than the
    window: invisible on short prompts, wrong on long ones.

    ## How it is confirmed
    Dynamic: the first divergent point is a local layer's `attn_out` at positions past the
    window; re-running the oracle with `sliding_window_offset=+1` (or -1) brings it back to the
    noise floor.

    ## Fix
    Mask keys with `q_idx - kv_idx >= window` (HF: `kv_idx > q_idx - sliding_window`;
    DeepMind: `cache_positions > positions - sliding_window_size`).

    ## References
    google-deepmind/gemma `gm/nn/_modules.py` (`create_sliding_mask`); huggingface/transformers
    `masking_utils.sliding_window_overlay`.
    """

    code = "LD503"
    name = "sliding-window-off-by-one"
    families = ("gemma2", "gemma3", "mistral", "phi3")
    knob = ("sliding_window_offset", 1)
    also = ({"sliding_window_offset": -1},)

    def applies(self, spec, dtype=None):
        # A window as long as the context never binds (Phi-3 128k's 262144): nothing to get wrong.
        return super().applies(spec, dtype) and bool(spec.sliding_window) and spec.sliding_window < spec.max_positions
