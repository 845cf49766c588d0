from llmdiff.check import Check


class GeluF16Table(Check):
    """## What it finds
    GELU read from a table of float16 results at the float16 rounding of its input, in a
    float32 model: llama.cpp's CPU backend (`GGML_GELU_FP16`, on by default).

    ## Why it matters
    A float32 run is expected to agree with float32 references to float32 rounding. The table
    rounds GELU's input and output to float16 (11 significant bits): every MLP activation is off
    by up to half a float16 ulp, ~3e-4 relative on Gemma's GeGLU, a thousand times float32's
    rounding, so a float32 GGUF cannot be held to float32 parity; the error adds up over layers.

    ## How it is confirmed
    Dynamic, in float32. The first divergent point is `L{i}.mlp_act` (gate and up still agree).
    Re-running the oracle with `gelu="f16_table"` (0 at x <= -10, x at x >= 10, else the tanh
    GELU of x rounded to float16, rounded to float16) brings the candidate back to the noise floor
    of that oracle: the table turns float32 noise into float16 steps (a gate a last bit off flips
    its float16 rounding), so the oracle with the knob on is itself ~16x further from its float64
    run at `L0.mlp_act` than the clean one, and more downstream; its trial is judged against
    that floor (`own_floor`), point by point.

    ## Fix
    Compute GELU in float32 (`ggml_gelu_f32`, built without `GGML_GELU_FP16` in
    ggml/src/ggml-cpu/vec.h), or accept float16 error and compare against a float16 bound.

    ## References
    ggml-org/llama.cpp ggml/src/ggml-cpu/vec.h (`GGML_GELU_FP16`, `ggml_vec_gelu_f32`,
    `ggml_vec_geglu_f32`, `ggml_table_gelu_f16`) and ggml-cpu.c, which fills the table with
    `GGML_CPU_FP32_TO_FP16(ggml_gelu_f32(f))` for every float16 f.
    """

    code = "LD302"
    name = "gelu-f16-table"
    knob = ("gelu", "f16_table")
    dtypes = ("float32",)
    acts_under_autocast = False
    own_floor = True   # a table at a rounded input: judged against the floor of the oracle with it on
