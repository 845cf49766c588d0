from llmdiff.check import Check


class QkvBiasDropped(Check):
    """## What it finds
    The q, k and v projections run without their biases (Qwen2 / Qwen2.5 have them; Llama-style
    ports build the projections bias-free and drop them silently when loading).

    ## Why it matters
    Qwen's biases are large on some heads (they carry positional and attention-sink behaviour):
    without them attention patterns change from the first layer on, and quality falls.

    ## How it is confirmed
    Dynamic: the first divergent point is layer 0's `q` (or `k`, `v`); re-running the oracle
    with `qkv_bias=False` brings it back to the noise floor.

    ## Fix
    Build the projections with `bias=True` (HF Qwen2: `nn.Linear(..., bias=True)`; a converter:
    keep `self_attn.{q,k,v}_proj.bias`), and check the loader reports no unused tensors.

    ## References
    huggingface/transformers `models/qwen2/modeling_qwen2.py` (`Qwen2Attention`);
    QwenLM/Qwen2.5 model card (attention QKV bias).
    """

    code = "LD507"
    name = "qkv-bias-dropped"
    families = ("qwen2",)
    knob = ("qkv_bias", False)

    def applies(self, spec, dtype=None):
        return super().applies(spec, dtype) and spec.qkv_bias
