from llmdiff.check import Check


class SlidingWindowNotApplied(Check):
    """## What it finds
    A model whose every layer attends through a sliding window (Mistral 7B v0.1: 4096; Phi-3
    mini 4k: 2047) runs with full causal attention: the attention path in use ignores
    `sliding_window`.

    ## Why it matters
    Past the window, each query sees keys the model never attended to in training: outputs on
    long prompts drift while short prompts are exact, so tests on short inputs pass.

    ## How it is confirmed
    Dynamic: the first divergent point is layer 0's `attn_out` at positions past the window;
    re-running the oracle with `sliding_window=False` brings it back to the noise floor.

    ## Fix
    Pass the window to the attention kernel (FlashAttention `window_size`, SDPA with a sliding
    mask) or build the mask with `kv_idx > q_idx - sliding_window`.

    ## References
    vllm-project/vllm issue 2064; huggingface/transformers issue 29623 (Mistral sliding window
    under SDPA); microsoft/Phi-3-mini-4k-instruct config.json (`sliding_window` 2047), which
    ports without sliding-window attention (torchtune's `phi3_mini`) run in full.
    """

    code = "LD508"
    name = "sliding-window-not-applied"
    families = ("mistral", "phi3")
    knob = ("sliding_window", False)

    def applies(self, spec, dtype=None):
        # A window as long as the context never binds (Phi-3 128k's 262144): nothing to get wrong.
        return super().applies(spec, dtype) and bool(spec.sliding_window) and spec.sliding_window < spec.max_positions
