from llmdiff.check import Check


class GeluExactVsTanh(Check):
    """## What it finds
    The MLP uses the exact (erf) GELU where the model was trained with the tanh approximation.

    ## Why it matters
    Gemma's GeGLU uses `gelu(x, approximate=True)`. The two differ by up to ~1e-3 per element;
    summed over every MLP of every layer the logits move visibly, with no crash and no warning.
    transformers 4.38.0 read `hidden_act="gelu"` from Gemma's config.json and built exact GELU.

    ## How it is confirmed
    Dynamic, in float32. The first divergent point is `L{i}.mlp_act` (gate and up still agree).
    Re-running the oracle with `gelu="exact"` brings the candidate back to the noise floor there.
    The two GELUs differ by less than one bfloat16 rounding, so compare in float32 to see it.

    ## Fix
    Use the tanh approximation: `hidden_activation="gelu_pytorch_tanh"` in the HF config
    (`gelu_pytorch_tanh`), `jax.nn.gelu(x, approximate=True)`, `approximate="tanh"` in PyTorch.

    ## References
    huggingface/transformers PR #29402 and the `hidden_activation` field added in 4.38.2;
    google-deepmind/gemma `gm/nn/_modules.py` (`nn.gelu`, approximate by default).
    """

    code = "LD301"
    name = "gelu-exact-vs-tanh"
    knob = ("gelu", "exact")
    dtypes = ("float32",)
