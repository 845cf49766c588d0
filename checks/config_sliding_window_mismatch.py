from llmdiff.check import ConfigCheck
from llmdiff.hf_format import sliding_layout


class ConfigSlidingWindowMismatch(ConfigCheck):
    """## What it finds
    config.json's `sliding_window` size, or the pattern of sliding-window and global layers
    (`layer_types`, Gemma 3's `sliding_window_pattern`, Gemma 2's implicit "even layers
    slide"), differs from the model's. Mistral slides `sliding_window` on every layer (4096
    when the field is absent, none when it is null), Phi-3 too (none when absent); Qwen 2.5 and 3 slide only with
    `use_sliding_window`, on the layers from `max_window_layers` on (or those `layer_types`
    names).

    ## Why it matters
    Which layers see the whole context and which only the last `window` tokens is part of the
    architecture. A wrong window or an off-by-one pattern gives identical outputs on prompts
    shorter than the window and wrong ones past it: the classic bug that tests with short
    prompts never see (Gemma 2's 4096-token window, Gemma 3's 1024). Mistral 7B v0.1 slides a
    4096 window on every layer and v0.3 none: a v0.3 config that leaves `sliding_window` out
    gets v0.1's window from transformers' default.

    ## How it is confirmed
    Static: config.json (absent fields take transformers' defaults) against the spec's
    `sliding_window` and `layer_types`.

    ## Fix
    Write the window and the per-layer pattern explicitly: `sliding_window` and
    `layer_types` (`"sliding_attention"` / `"full_attention"` per layer); Mistral 7B v0.3
    `"sliding_window": null`; Qwen 2.5 and 3 `"use_sliding_window": false`; Phi-3 mini 4k
    `"sliding_window": 2047`, 128k and 3.5 `262144`.

    ## References
    Gemma 2 report (arXiv:2408.00118) and Gemma 3 report (arXiv:2503.19786);
    huggingface/transformers 4.53 `layer_types`; `MistralConfig`, `Qwen2Config` (`use_sliding_window`,
    `max_window_layers`); mistralai/Mistral-7B-v0.3 config.json.
    """

    code = "LD708"
    name = "config-sliding-window-mismatch"
    families = ("gemma2", "gemma3", "mistral", "qwen2", "qwen3", "phi3")

    def check(self, ctx, spec):
        layout = sliding_layout(ctx.config, ctx.family)
        if layout.window != spec.sliding_window:
            yield self.differs(ctx, layout.field, layout.value, layout.present, spec.sliding_window,
                               note=layout.note, window=layout.window,
                               uses=f"uses {spec.sliding_window}" if spec.sliding_window else "slides on no layer")
        types, field = layout.types, layout.types_field
        if field is not None and types != spec.layer_types:
            first = next((i for i, (a, b) in enumerate(zip(types, spec.layer_types)) if a != b),
                         min(len(types), len(spec.layer_types)))
            yield self.finding(ctx, f"config.json:{field.split()[0]}",
                               f"layer pattern from {field} differs from {spec.name}'s at layer {first}:"
                               f" {types[first] if first < len(types) else 'none'} where the model has"
                               f" {spec.layer_types[first] if first < len(spec.layer_types) else 'none'}",
                               {"config": list(types), "spec": list(spec.layer_types), "first_layer": first})
