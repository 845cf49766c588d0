from llmdiff.check import Check


class QkNormAcrossHeads(Check):
    """## What it finds
    The q/k RMSNorm (Qwen3's `q_norm` / `k_norm`, Gemma 3's query and key norms) takes its
    statistics over the whole projection, every head at once, with the per-head scale tiled,
    instead of over each head's `head_dim` features.

    ## Why it matters
    Qwen3 and Gemma 3 normalise each head on its own (one scale of `head_dim` shared by the
    heads); OLMo 2 normalises the whole projection. A port that reuses the other layout gives
    each head the norm of all of them: heads of small norm stay small, large ones large, and
    the attention logits change on every layer.

    ## How it is confirmed
    Dynamic: the first divergent point is layer 0's `q` (or `k`); re-running the oracle with
    `qk_norm_scope="all_heads"` brings it back to the noise floor.

    ## Fix
    Reshape q and k to (..., heads, head_dim) before the norm and normalise the last axis only,
    with the checkpoint's (head_dim,) scale.

    ## References
    huggingface/transformers `models/qwen3/modeling_qwen3.py` (`self.q_norm(...view(hidden_shape))`,
    `Qwen3RMSNorm(self.head_dim)`) against `models/olmo2/modeling_olmo2.py` (`Olmo2RMSNorm(num_heads
    * head_dim)`).
    """

    code = "LD210"
    name = "qk-norm-across-heads"
    families = ("qwen3", "gemma3")
    knob = ("qk_norm_scope", "all_heads")

    def applies(self, spec, dtype=None):
        return super().applies(spec, dtype) and spec.qk_norm
