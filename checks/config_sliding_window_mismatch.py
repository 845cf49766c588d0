from llmdiff.check import Check


def config_layer_types(ctx) -> tuple[list[str], str]:
    """Each layer's attention as transformers reads config.json, and which field said so."""
    from llmdiff.audit import config_value, text_config

    cfg = text_config(ctx.config)
    n = int(cfg.get("num_hidden_layers") or 0)
    if isinstance(cfg.get("layer_types"), list):
        names = {"sliding_attention": "local", "full_attention": "global"}
        return [names.get(t, str(t)) for t in cfg["layer_types"]], "layer_types"
    if ctx.family == "gemma3":
        period, present = config_value(ctx, "sliding_window_pattern")
        period = int(period or 1)
        return ["global" if (i + 1) % period == 0 else "local" for i in range(n)], (
            "sliding_window_pattern" if present else "sliding_window_pattern (absent)")
    return ["local" if i % 2 == 0 else "global" for i in range(n)], "(Gemma 2: even layers slide)"


class ConfigSlidingWindowMismatch(Check):
    """## What it finds
    config.json's `sliding_window` size, or the pattern of sliding-window and global layers
    (`layer_types`, Gemma 3's `sliding_window_pattern`, Gemma 2's implicit "even layers
    slide"), differs from the model's.

    ## Why it matters
    Which layers see the whole context and which only the last `window` tokens is part of the
    architecture. A wrong window or an off-by-one pattern gives identical outputs on prompts
    shorter than the window and wrong ones past it: the classic bug that tests with short
    prompts never see (Gemma 2's 4096-token window, Gemma 3's 1024).

    ## How it is confirmed
    Static: config.json (absent fields take transformers' defaults) against the spec's
    `sliding_window` and `layer_types`.

    ## Fix
    Write the window and the per-layer pattern explicitly: `sliding_window` and
    `layer_types` (`"sliding_attention"` / `"full_attention"` per layer).

    ## References
    Gemma 2 report (arXiv:2408.00118) and Gemma 3 report (arXiv:2503.19786);
    huggingface/transformers 4.53 `layer_types`.
    """

    code = "LD708"
    name = "config-sliding-window-mismatch"
    target = "checkpoint"
    families = ("gemma2", "gemma3")

    def run(self, ctx):
        from llmdiff.audit import config_value, shown

        spec = ctx.spec
        if spec is None or spec.family not in self.families:
            return
        window, present = config_value(ctx, "sliding_window")
        if window != spec.sliding_window:
            yield self.finding(ctx, "config.json:sliding_window", f"sliding_window is {shown(window, present)}"
                               f" but {spec.name} uses {spec.sliding_window}",
                               {"config": window, "spec": spec.sliding_window, "present": present})
        types, field = config_layer_types(ctx)
        if tuple(types) != tuple(spec.layer_types):
            first = next((i for i, (a, b) in enumerate(zip(types, spec.layer_types)) if a != b),
                         min(len(types), len(spec.layer_types)))
            yield self.finding(ctx, f"config.json:{field.split()[0]}",
                               f"layer pattern from {field} differs from {spec.name}'s at layer {first}:"
                               f" {types[first] if first < len(types) else 'none'} where the model has"
                               f" {spec.layer_types[first] if first < len(spec.layer_types) else 'none'}",
                               {"config": types, "spec": list(spec.layer_types), "first_layer": first})
