from llmdiff.check import Check


class EmbedScaleNotRounded(Check):
    """## What it finds
    The embeddings are multiplied by sqrt(hidden_size) as a full-precision number instead of the
    normaliser rounded to the compute dtype first.

    ## Why it matters
    The reference computes `x * jnp.sqrt(embed_dim).astype(x.dtype)`: in bfloat16,
    sqrt(3072) = 55.4256 becomes 55.5, a 0.13% larger input to every layer. An implementation
    that multiplies by the python float is more "exact" and still wrong, in bfloat16 only.

    ## How it is confirmed
    Dynamic, bfloat16 only. Correct implementations produce bit-identical `embed`; this bug
    breaks that exactness at `embed`, and re-running the oracle with
    `embed_scale="python_float"` makes the candidate exact again.

    ## Fix
    Round the normaliser to the compute dtype before the multiply:
    `normalizer = torch.tensor(hidden_size ** 0.5, dtype=hidden_states.dtype)`.

    ## References
    huggingface/transformers PR #29402 (Gemma fixes); google-deepmind/gemma `Embedder.encode`.
    """

    code = "LD101"
    name = "embed-scale-not-rounded"
    knob = ("embed_scale", "python_float")
    dtypes = ("bfloat16",)
