from llmdiff.check import Check


class DisabledSlidingWindowApplied(Check):
    """## What it finds
    A model whose config.json carries a sliding window but switches it off (Qwen 2.5:
    `sliding_window` with `use_sliding_window: false`) runs with the window on every layer: the
    port reads `sliding_window` alone.

    ## Why it matters
    No layer of the model slides. A query past the window loses every key further back than
    the window, so long prompts drift while short ones are exact. Published Qwen 2.5 configs
    set the window to the context length, where it never binds; a config with a shorter one
    (a fine-tune, a context cut down, a converter's default) turns the same port wrong.

    ## How it is confirmed
    Dynamic: the first divergent point is layer 0's `attn_out`, from the position equal to the
    window on (`from_position`); re-running the oracle with `disabled_window_applied=True` (every
    layer slides by the carried window) brings it back to the noise floor; its other forms apply
    the window one key too wide or too narrow (`sliding_window_offset` +-1), as transformers
    4.40's mask utility did (`t - s <= window`).

    ## Fix
    Apply `sliding_window` only where `use_sliding_window` is true (and, in Qwen2's own code,
    only on layers from `max_window_layers` on): transformers' `Qwen2Config` sets
    `sliding_window = sliding_window if use_sliding_window else None`.

    ## References
    huggingface/transformers `Qwen2Config` (`use_sliding_window`, `max_window_layers`) and
    `Qwen2Attention.sliding_window`; Qwen/Qwen2.5-0.5B config.json (`"sliding_window": 32768`,
    `"use_sliding_window": false`); llama.cpp `convert_hf_to_gguf` (writes a window only when
    `use_sliding_window` is set).
    """

    code = "LD510"
    name = "disabled-sliding-window-applied"
    families = ("qwen2", "qwen3")
    knob = ("disabled_window_applied", True)
    # transformers before 4.42 applied it counted as `t - s <= window` (its mask utility's
    # `tril(diagonal=-window - 1)`), one key more than the window: 4.40.0's Qwen2, eager and SDPA.
    also = ({"sliding_window_offset": 1}, {"sliding_window_offset": -1})

    def applies(self, spec, dtype=None):
        # Only a carried window shorter than the context can cut a query off (published Qwen
        # 2.5's equals the context: there it never binds).
        window = getattr(spec, "disabled_sliding_window", None)
        return super().applies(spec, dtype) and bool(window) and window < spec.max_positions
