from llmdiff.check import Check


class QkNormAfterRope(Check):
    """## What it finds
    The per-head RMSNorm of q and k (Qwen3's `q_norm` / `k_norm`, Gemma 3's query and key
    norms) applied to the rotated q and k, after RoPE, instead of to the projections' output
    before it.

    ## Why it matters
    RoPE rotates pairs of features (i, i + head_dim/2) and keeps each head's norm, so the
    normaliser is the same; but the norm's per-feature scale then multiplies rotated features:
    feature i is scaled by w[i] where the model meant a mix of w[i] and w[i + head_dim/2].
    Attention logits change at every position but the first, on every layer.

    ## How it is confirmed
    Dynamic: the first divergent point is layer 0's `q` (or `k`, after RoPE); re-running the
    oracle with `qk_norm_order="after_rope"` brings it back to the noise floor.

    ## Fix
    Normalise each head of q and of k right after the projections, then apply RoPE
    (`q = rope(q_norm(q_proj(x)))`).

    ## References
    huggingface/transformers `models/qwen3/modeling_qwen3.py` (`Qwen3Attention.forward`:
    `self.q_norm(self.q_proj(hidden_states).view(hidden_shape))` before
    `apply_rotary_pos_emb`); google-deepmind/gemma `gm/nn/_modules.py` (`Attention`).
    """

    code = "LD209"
    name = "qk-norm-after-rope"
    families = ("qwen3", "gemma3")
    knob = ("qk_norm_order", "after_rope")

    def applies(self, spec, dtype=None):
        return super().applies(spec, dtype) and spec.qk_norm
