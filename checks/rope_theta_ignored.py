from llmdiff.check import Check


class RopeThetaIgnored(Check):
    """## What it finds
    RoPE run with base 10000 although the model's `rope_theta` is another (Llama 3: 500000;
    Qwen 2.5 and 3, Mistral 7B v0.3: 1000000): a port that hard-codes the original RoPE base
    or reads a config field name that is not there.

    ## Why it matters
    Every frequency but the first rotates q and k by the wrong angle at every position. The
    model still writes plausible text on short prompts; quality falls with distance, and long
    context breaks, with no error anywhere.

    ## How it is confirmed
    Dynamic: the first divergent point is layer 0's `q` (or `k`, after RoPE); re-running the
    oracle with `rope_theta="default"` (base 10000 on every layer, the model's RoPE scaling
    kept) brings it back to the noise floor.

    ## Fix
    Build the frequencies from the config's `rope_theta` (transformers 5: `rope_parameters`),
    `inv_freq = 1 / rope_theta ** (arange(0, head_dim, 2) / head_dim)`.

    ## References
    meta-llama/llama-models `models/llama3/args.py` (`rope_theta: float = 500000`);
    Qwen/Qwen2.5-0.5B config.json (`rope_theta: 1000000.0`); huggingface/transformers
    `modeling_rope_utils._compute_default_rope_parameters`.
    """

    code = "LD409"
    name = "rope-theta-ignored"
    families = ("llama", "qwen2", "qwen3", "mistral", "phi3")
    knob = ("rope_theta", "default")

    def applies(self, spec, dtype=None):
        return super().applies(spec, dtype) and 10_000.0 not in (spec.rope_base, spec.rope_base_local)
