from llmdiff.check import Check

_TYPES = {"global": "full_attention", "local": "sliding_attention"}


def _scale(scaling) -> tuple[str, float]:
    if not isinstance(scaling, dict):
        return "default", 1.0
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return "default", 1.0
    return kind, float(scaling.get("factor", 1.0))


def effective_rope(ctx) -> dict:
    """layer type -> (base, scaling type, factor) as transformers will read config.json."""
    from llmdiff.audit import config_value, text_config

    cfg = text_config(ctx.config)
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):   # transformers 5: per layer type, or one for all layers
        out = {}
        for kind, hf in _TYPES.items():
            p = params.get(hf, params) if isinstance(params.get(hf), dict) else params
            out[kind] = (p.get("rope_theta"), *_scale(p))
        return out
    base = config_value(ctx, "rope_theta")[0]
    scaling = config_value(ctx, "rope_scaling")[0]
    out = {"global": (base, *_scale(scaling))}
    if ctx.family == "gemma3":   # local layers: their own base, never scaled
        out["local"] = (config_value(ctx, "rope_local_base_freq")[0], "default", 1.0)
    else:
        out["local"] = out["global"]
    return out


class ConfigRopeMismatch(Check):
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
    target = "checkpoint"

    def run(self, ctx):
        import math

        spec = ctx.spec
        if spec is None:
            return
        want = {"global": (spec.rope_base, spec.rope_scale), "local": (spec.rope_base_local, spec.rope_scale_local)}
        have = effective_rope(ctx)
        for kind in sorted(set(spec.layer_types)):
            base, rope_type, factor = have[kind]
            base_ok = isinstance(base, (int, float)) and math.isclose(base, want[kind][0], rel_tol=1e-9)
            scale_ok = math.isclose(factor, want[kind][1]) and rope_type in ("default", "linear")
            if not (base_ok and scale_ok):
                yield self.finding(
                    ctx, f"config.json:rope ({kind} layers)",
                    f"{kind} layers: RoPE base {base!r}, {rope_type} scaling x{factor:g}; {spec.name} uses base"
                    f" {want[kind][0]:g}, " + ("linear scaling x%g" % want[kind][1] if want[kind][1] != 1 else "no scaling"),
                    {"layer_type": kind, "base": base, "scaling": rope_type, "factor": factor,
                     "spec_base": want[kind][0], "spec_factor": want[kind][1]})
