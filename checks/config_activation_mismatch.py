from llmdiff.check import ConfigCheck
from llmdiff.hf_format import HF_DEFAULTS, text_config
from llmdiff.spec import GEMMA_FAMILIES

TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_tanh")
SILU = ("silu", "swish")   # transformers' ACT2FN: both are nn.SiLU


class ConfigActivationMismatch(ConfigCheck):
    """## What it finds
    config.json's activation is not the one the family uses, or is set in the field the
    family's transformers class does not read: Gemma 2 and 3 read `hidden_activation` only, so
    a config with only `hidden_act` is silently ignored; Gemma 1 with `hidden_act="gelu"` and
    no `hidden_activation` builds exact GELU in transformers 4.38.0. Also: the two fields
    disagree. Llama, Qwen and Mistral read `hidden_act` only, which must be SiLU (`silu`) for
    their SwiGLU MLP; a `hidden_activation` that says otherwise is ignored by transformers.

    ## Why it matters
    Gemma's MLP is GeGLU with the tanh approximation of GELU. Exact GELU differs by up to 1e-3
    per element and moves the logits with no error; a field nobody reads makes a config edit
    (or another tool's reading of it) disagree with what runs. A Llama-family MLP with GELU
    instead of SiLU runs another network from the same weights.

    ## How it is confirmed
    Static: config.json's `hidden_act` and `hidden_activation` against the spec's activation
    and the family's reading rule (absent fields take transformers' defaults).

    ## Fix
    Gemma: set `"hidden_activation": "gelu_pytorch_tanh"` (and `hidden_act` to the same value
    for tools that read that one). Llama, Qwen, Mistral: `"hidden_act": "silu"`.

    ## References
    huggingface/transformers PR #29402 and 4.38.2 (`hidden_activation`); `Gemma2Config`,
    `Gemma3TextConfig`; google-deepmind/gemma (`nn.gelu`, approximate); `LlamaConfig`
    (`hidden_act="silu"`), Meta's Llama 3 `FeedForward` (`F.silu`).
    """

    code = "LD705"
    name = "config-activation-mismatch"
    needs_spec = False

    def check(self, ctx, spec):
        cfg = text_config(ctx.config)
        act, activation = cfg.get("hidden_act"), cfg.get("hidden_activation")
        if ctx.family not in GEMMA_FAMILIES:   # Llama, Qwen, Mistral: SwiGLU, from hidden_act alone
            used = self.value(ctx, "hidden_act")[0]
            if used not in SILU:
                yield self.finding(ctx, "config.json:hidden_act", f"hidden_act={used!r} but"
                                   f" {spec.name if spec else ctx.family} uses SiLU (SwiGLU: silu)",
                                   {"field": "hidden_act", "value": used})
            elif activation is not None and activation not in SILU:
                yield self.finding(ctx, "config.json:hidden_activation", f"hidden_activation={activation!r}"
                                   f" disagrees with hidden_act={used!r}; {ctx.family} reads only hidden_act, so"
                                   " tools reading hidden_activation run another activation",
                                   {"hidden_act": used, "hidden_activation": activation})
            return
        if ctx.family == "gemma":
            used, field = (activation, "hidden_activation") if activation is not None else (act, "hidden_act")
            if used is None:
                used, field = HF_DEFAULTS["gemma"]["hidden_act"], "hidden_act (absent)"
        else:
            if "hidden_activation" not in cfg and act is not None:
                default = HF_DEFAULTS[ctx.family]["hidden_activation"]
                yield self.finding(ctx, "config.json:hidden_act",
                                   f"only hidden_act={act!r} is set; {ctx.family} reads hidden_activation,"
                                   f" so it is ignored and {default!r} runs", {"hidden_act": act, "used": default})
                return
            used, field = self.value(ctx, "hidden_activation")[0], "hidden_activation"
        if (spec is None or spec.activation == "gelu_tanh") and used not in TANH_GELU:
            yield self.finding(ctx, f"config.json:{field.split()[0]}",
                               f"{field}={used!r} but {spec.name if spec else ctx.family} uses"
                               " tanh-approximated GELU (gelu_pytorch_tanh)", {"field": field, "value": used})
        elif act is not None and activation is not None and (act in TANH_GELU) != (activation in TANH_GELU):
            yield self.finding(ctx, "config.json:hidden_act", f"hidden_act={act!r} and hidden_activation="
                               f"{activation!r} disagree; tools reading hidden_act run another activation",
                               {"hidden_act": act, "hidden_activation": activation})
