from llmdiff.check import ALL_FAMILIES, Check


class KvRoundedToF16(Check):
    """## What it finds
    Attention's K and V rounded to float16 in a float32 model: a float16 KV cache, or llama.cpp's
    flash attention (on by default on the CPU), which casts an F32 cache's K and V to F16 before
    `ggml_flash_attn_ext`.

    ## Why it matters
    A float32 run is expected to agree with float32 references to float32 rounding. Rounding K
    and V to float16 (11 significant bits) puts an error of ~2^-12 relative on every attention
    score and every value summed, a thousand times float32's rounding, at every layer: a
    float32 model with this cache cannot be held to float32 parity, and "F32 KV cache" does not
    mean what it says.

    ## How it is confirmed
    Dynamic, in float32. The first divergent point is `L{i}.attn_out` (q, k and v themselves
    still agree: the rounding is inside attention). Re-running the oracle with `kv_f16` (K and V
    rounded to float16 before q.k and probs.v, the rest as before) brings the candidate back to
    the noise floor; llama.cpp's CPU kernel is also tried (`kv_f16_short`: a prompt under 64
    tokens takes ggml's one-chunk kernel, which rounds the scaled q to float16 too and sums
    probs.v in a float16 accumulator). A float16 rounding turns float32 noise into float16 steps
    (a k a last bit off flips its rounding), so the trial is judged against the floor of the
    oracle with the knob on (`own_floor`).

    ## Fix
    Keep K and V in the model's dtype: llama.cpp with flash attention off (`-fa off`,
    `flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED`), or a KV cache in float32; or accept
    float16 error and compare against a float16 bound.

    ## References
    ggml-org/llama.cpp src/llama-graph.cpp (`build_attn_mha`: `ggml_cast(ctx0, k, GGML_TYPE_F16)`
    when the cache is F32 and flash attention is on) and ggml/src/ggml-cpu/ops.cpp
    (`ggml_compute_forward_flash_attn_ext_tiled`: F32 q, F16 K and V; below `GGML_FA_TILE_Q`
    query rows `ggml_compute_forward_flash_attn_ext_f16_one_chunk`: q converted to F16, an F16
    `VKQ16` accumulator).
    """

    code = "LD511"
    name = "kv-rounded-to-f16"
    families = ALL_FAMILIES
    knob = ("kv_f16", True)
    also = ({"kv_f16_short": True},)
    dtypes = ("float32",)
    acts_under_autocast = False
    own_floor = True   # a float16 rounding of a float32 value: judged against the floor of the oracle with it on
