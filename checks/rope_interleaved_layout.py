from llmdiff.check import ALL_FAMILIES, Check


class RopeInterleavedLayout(Check):
    """## What it finds
    RoPE rotates adjacent pairs (x[2i], x[2i+1]) where Gemma rotates halves (x[i], x[i + H/2]).

    ## Why it matters
    The two layouts are the same maths on differently permuted q/k projection weights. Mixing
    them (a GPT-J or complex-number RoPE on weights converted for `rotate_half`, or a converter
    that permutes once too often) rotates the wrong features by the wrong angles.

    ## How it is confirmed
    Dynamic: the first divergent points are `L0.q` and `L0.k` (v agrees); re-running the oracle
    with `rope_layout="interleaved"` brings them back to the noise floor.

    ## Fix
    Use `rotate_half` (split into halves) with Gemma's weights as released, or permute the q and
    k projection rows when converting to an interleaved implementation, not both.

    ## References
    huggingface/transformers `convert_llama_weights_to_hf.py` (`permute`);
    google-deepmind/gemma `gm/math/_positional_embeddings.py`.
    """

    code = "LD405"
    name = "rope-interleaved-layout"
    families = ALL_FAMILIES
    knob = ("rope_layout", "interleaved")
