from llmdiff.check import Check


class QkNormMissing(Check):
    """## What it finds
    The per-head RMSNorm of q and k (Qwen3's `q_norm` / `k_norm`, Gemma 3's query and key norms)
    is left out: q and k go to RoPE unnormalised.

    ## Why it matters
    The model was trained with normalised queries and keys: without the norm, attention logits
    take another scale on every head and the model's output drifts from the first layer on.

    ## How it is confirmed
    Dynamic: the first divergent point is layer 0's `q` (or `k`); re-running the oracle with
    `qk_norm=False` brings it back to the noise floor.

    ## Fix
    Apply `RMSNorm(head_dim)` to each head of q and of k after the projections and before RoPE,
    with the checkpoint's `self_attn.q_norm.weight` / `k_norm.weight`.

    ## References
    huggingface/transformers `models/qwen3/modeling_qwen3.py` (`Qwen3Attention`);
    google-deepmind/gemma `gm/nn/_modules.py` (`use_qk_norm`).
    """

    code = "LD207"
    name = "qk-norm-missing"
    families = ("qwen3", "gemma3")
    knob = ("qk_norm", False)

    def applies(self, spec, dtype=None):
        return super().applies(spec, dtype) and spec.qk_norm
