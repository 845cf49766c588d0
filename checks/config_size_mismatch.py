from llmdiff.check import ConfigCheck
from llmdiff.hf_format import size_differences


class ConfigSizeMismatch(ConfigCheck):
    """## What it finds
    config.json's sizes (hidden size, MLP width, layers, heads, kv heads, head_dim) differ
    from the model named with `--model`.

    ## Why it matters
    A checkpoint published under a model's name whose config describes another model (a
    copied config, a pruned or merged model) will load into the wrong architecture in tools
    that go by the name, and every size-dependent constant (the embedding normaliser
    sqrt(hidden), the query scale) is then wrong.

    ## How it is confirmed
    Static: config.json against the spec of `--model` (full size, or tiny when the config has
    the tiny sizes). Without `--model` the spec is the one whose sizes match, so this check
    only speaks when a model is named.

    ## Fix
    Audit with the right `--model`, or fix config.json.

    ## References
    `llmdiff models` lists the specs; the published config.json of each model.
    """

    code = "LD711"
    name = "config-size-mismatch"

    def check(self, ctx, spec):
        wrong = size_differences(ctx.config, spec)
        if wrong:
            sizes = ", ".join(f"{k} {v['config']} (spec {v['spec']})" for k, v in wrong.items())
            yield self.finding(ctx, f"config.json:{next(iter(wrong))}",
                               f"{len(wrong)} sizes differ from {spec.name}: {sizes}", wrong)
