from llmdiff.check import ConfigCheck
from llmdiff.hf_format import rope_by_layer_type, same_rope, spec_rope, text_config


class ConfigRopeMismatch(ConfigCheck):
    """## What it finds
    RoPE base (`rope_theta`, Gemma 3's `rope_local_base_freq`) or scaling (`rope_scaling`,
    or transformers 5's `rope_parameters`) that differs from the model's, per layer type:
    global layers and sliding-window layers. Llama 3.1/3.2 need `rope_type` (or the older
    name `type`) "llama3" with the model's `factor`, `low_freq_factor`, `high_freq_factor` and
    `original_max_position_embeddings`. Also: a scaling whose `rope_type` and `type` name two
    different kinds.

    ## Why it matters
    A wrong base rotates queries and keys by the wrong angles at every position past the
    first few: short prompts look fine, long ones degrade. Gemma 3 scales RoPE by 8 on global
    layers only; scaling the local ones too, or forgetting the 1M global base, breaks long
    context with no error. Llama 3.1 without its llama3 scaling (or with linear scaling by 8,
    a common conversion) runs every frequency band wrong past the original 8192 tokens.

    ## How it is confirmed
    Static: config.json (absent fields take transformers' defaults) against the spec's
    `rope_base`, `rope_base_local`, `rope_scale`, `rope_scale_local` and `rope_llama3`, for
    each layer type the model has. The kind is read as transformers reads it: `rope_type`,
    else `type`.

    ## Fix
    Gemma 3: `rope_theta: 1000000`, `rope_local_base_freq: 10000`, and for 4B/12B/27B
    `rope_scaling: {"rope_type": "linear", "factor": 8.0}`; Gemma 1/2: `rope_theta: 10000`,
    no scaling. Llama 3.1: `rope_theta: 500000`, `rope_scaling: {"rope_type": "llama3",
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}` (3.2: factor 32); Qwen 2.5 and 3, Mistral 7B
    v0.3: `rope_theta: 1000000`, no scaling (Mistral v0.1: 10000). Name one kind only.

    ## References
    Gemma 3 report (arXiv:2503.19786, section 2.1); google-deepmind/gemma `_gemma.py`;
    meta-llama/Llama-3.1-8B config.json; huggingface/transformers `modeling_rope_utils`
    (`_compute_llama3_parameters`, `rope_type` read before `type`).
    """

    code = "LD707"
    name = "config-rope-mismatch"

    def check(self, ctx, spec):
        want, have = spec_rope(spec), rope_by_layer_type(ctx.config, ctx.family)
        for kind in sorted(set(spec.layer_types)):
            rope, model = have[kind], want[kind]
            if not same_rope(rope, model):
                yield self.finding(
                    ctx, f"config.json:rope ({kind} layers)",
                    f"{kind} layers: RoPE base {rope.base!r}, {rope.describe()}; {spec.name} uses base {model.base:g}, "
                    + ("no scaling" if model.type == "default" else model.describe()),
                    {"layer_type": kind, "base": rope.base, "scaling": rope.type, "factor": rope.factor,
                     "spec_base": model.base, "spec_factor": model.factor,
                     **({"llama3": rope.llama3, "spec_llama3": model.llama3} if model.llama3 else {})})
        field = "rope_parameters" if isinstance(text_config(ctx.config).get("rope_parameters"), dict) else "rope_scaling"
        for rope_type, old_name in sorted({r.both_types for r in have.values() if r.both_types}):
            yield self.finding(ctx, f"config.json:{field}",
                               f"RoPE scaling names rope_type {rope_type!r} and type {old_name!r}: transformers"
                               f" runs {rope_type}, tools that read type run {old_name}",
                               {"rope_type": rope_type, "type": old_name})
