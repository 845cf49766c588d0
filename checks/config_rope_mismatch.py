import math

from llmdiff.check import ConfigCheck
from llmdiff.hf_format import rope_by_layer_type


class ConfigRopeMismatch(ConfigCheck):
    """## What it finds
    RoPE base (`rope_theta`, Gemma 3's `rope_local_base_freq`) or scaling (`rope_scaling`,
    or transformers 5's `rope_parameters`) that differs from the model's, per layer type:
    global layers and sliding-window layers.

    ## Why it matters
    A wrong base rotates queries and keys by the wrong angles at every position past the
    first few: short prompts look fine, long ones degrade. Gemma 3 scales RoPE by 8 on global
    layers only; scaling the local ones too, or forgetting the 1M global base, breaks long
    context with no error.

    ## How it is confirmed
    Static: config.json (absent fields take transformers' defaults) against the spec's
    `rope_base`, `rope_base_local`, `rope_scale` and `rope_scale_local`, for each layer type
    the model has.

    ## Fix
    Gemma 3: `rope_theta: 1000000`, `rope_local_base_freq: 10000`, and for 4B/12B/27B
    `rope_scaling: {"rope_type": "linear", "factor": 8.0}`; Gemma 1/2: `rope_theta: 10000`,
    no scaling.

    ## References
    Gemma 3 report (arXiv:2503.19786, section 2.1); google-deepmind/gemma `_gemma.py`.
    """

    code = "LD707"
    name = "config-rope-mismatch"

    def check(self, ctx, spec):
        want = {"global": (spec.rope_base, spec.rope_scale), "local": (spec.rope_base_local, spec.rope_scale_local)}
        have = rope_by_layer_type(ctx.config, ctx.family)
        for kind in sorted(set(spec.layer_types)):
            rope, (base, factor) = have[kind], want[kind]
            base_ok = isinstance(rope.base, (int, float)) and math.isclose(rope.base, base, rel_tol=1e-9)
            scale_ok = math.isclose(rope.factor, factor) and rope.type in ("default", "linear")
            if not (base_ok and scale_ok):
                yield self.finding(
                    ctx, f"config.json:rope ({kind} layers)",
                    f"{kind} layers: RoPE base {rope.base!r}, {rope.type} scaling x{rope.factor:g}; {spec.name} uses"
                    f" base {base:g}, " + ("linear scaling x%g" % factor if factor != 1 else "no scaling"),
                    {"layer_type": kind, "base": rope.base, "scaling": rope.type, "factor": rope.factor,
                     "spec_base": base, "spec_factor": factor})
