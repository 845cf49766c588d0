"""The Hugging Face checkpoint format: what a checkpoint's config.json says, as transformers
reads it. The one owner of that knowledge; the core (`weights.hf_config`,
`weights.read_hf_checkpoint`), `llmdiff audit` and the audit's checks all read it from here:

- which `model_type` is which spec family, and its architecture class;
- the size fields and the spec fields they hold (`CONFIG_FIELDS`, one map);
- the JSON type of every field llmdiff reads (`check_config`: a wrong type is one line);
- what transformers uses when a field is absent (`HF_DEFAULTS`, the defaults of each family's
  config class, with the releases where they changed) and `config_value`, which applies them;
- the RoPE (`rope_by_layer_type`) and sliding-window layout (`sliding_layout`) each layer gets;
- a spec built from config.json's own sizes (`config_spec`), to derive the tensors it implies.

Which files of a checkpoint directory are weights, pickles or code, and how they are opened
safely, is `llmdiff.checkpoint_files`'s. Pure Python (stdlib only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llmdiff.errors import WeightsError

# --- families -------------------------------------------------------------------------------

# Family -> the transformers class of its text-only causal LM.
ARCHITECTURES = {
    "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# Family -> the `model_type`s of its config.json, the one llmdiff writes first. Gemma 3's
# multimodal checkpoints say "gemma3" and nest the language model's config in `text_config`.
MODEL_TYPES = {
    "gemma": ("gemma",), "gemma2": ("gemma2",), "gemma3": ("gemma3_text", "gemma3"),
    "llama": ("llama",), "qwen2": ("qwen2",), "qwen3": ("qwen3",), "mistral": ("mistral",),
}
_FAMILY_OF = {model_type: family for family, types in MODEL_TYPES.items() for model_type in types}


def text_config(config: dict) -> dict:
    """The language model's part of a config (Gemma 3 multimodal nests it in `text_config`)."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def family_of(config: dict) -> str | None:
    """The spec family of a config.json (by its language model's `model_type`), None when unknown."""
    return _FAMILY_OF.get(text_config(config).get("model_type"))


# --- sizes ----------------------------------------------------------------------------------

CONFIG_FIELDS = {  # config.json key -> ModelSpec field
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "mlp_dim",
    "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim",
}


def spec_sizes(spec) -> dict:
    """The CONFIG_FIELDS values config.json has for `spec` (vocab_size: HF's table rows)."""
    return {key: (spec.hf_vocab_size or spec.vocab_size) if field == "vocab_size" else getattr(spec, field)
            for key, field in CONFIG_FIELDS.items()}


def size_differences(config: dict, spec) -> dict:
    """{key: {"config": value, "spec": value}} for each size but vocab_size (whose rows are
    `vocab-size-mismatch`'s) that config.json does not share with `spec`."""
    cfg, want = text_config(config), spec_sizes(spec)
    return {key: {"config": cfg.get(key), "spec": want[key]} for key in CONFIG_FIELDS
            if key != "vocab_size" and cfg.get(key) != want[key]}


def config_spec(config: dict, family: str | None):
    """A ModelSpec built from config.json's own sizes, with the family's architecture (q/k norms,
    qkv biases, post norms, from its registered specs), to derive the tensor shapes it implies.
    The head is tied: whether `lm_head` is there is `tied-embedding-inconsistent`'s to judge.
    None for an unknown family or sizes that are missing."""
    from llmdiff.spec import get_spec, model_names

    cfg = text_config(config)
    template = next((s for s in map(get_spec, model_names()) if s.family == family), None)
    if template is None:
        return None
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        sizes = {"vocab_size": int(cfg["vocab_size"]), "hidden_size": hidden,
                 "num_hidden_layers": int(cfg["num_hidden_layers"]), "num_attention_heads": heads,
                 "num_key_value_heads": int(cfg.get("num_key_value_heads") or heads),
                 "head_dim": int(cfg.get("head_dim") or hidden // heads),
                 "intermediate_size": int(cfg["intermediate_size"])}
    except (KeyError, TypeError, ValueError):
        return None
    return dataclasses.replace(
        template, name="config.json", **{field: sizes[key] for key, field in CONFIG_FIELDS.items()},
        hf_vocab_size=None, attention_types=(), tie_embeddings=True, tiny=False)


# --- JSON types -----------------------------------------------------------------------------

# The config fields llmdiff reads, by the JSON type transformers needs them in. Checked once up
# front, so a wrong type is one line naming the field (exit 2) instead of a traceback, or a
# wrong finding, in whichever check reads it. Absent is fine (transformers' default); null is
# "unset" for all but the sizes every model needs.
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_POSITIVE_INTS = (*_SIZES, "num_key_value_heads", "head_dim", "sliding_window", "sliding_window_pattern")
_NUMBERS = ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar",
            "attn_logit_softcapping", "final_logit_softcapping")
_STRINGS = ("model_type", "hidden_act", "hidden_activation", "torch_dtype", "dtype")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# No model has nearly this many layers; more would only make the checks loop over them.
MAX_LAYERS = 10_000
_UNSET = object()


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def json_kind(value) -> str:
    """How an error message names a JSON value's type: "an object", "a string", "null"..."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def check_config(config: dict, file: str = "config.json") -> None:
    """WeightsError naming the first field llmdiff reads whose JSON type is wrong."""
    inner = config.get("text_config")
    if inner is not None and not isinstance(inner, dict):
        raise WeightsError(f"{file}: text_config must be an object, found {json_kind(inner)}")
    cfg = text_config(config)

    def fail(key, expected, value=_UNSET):
        where = f"text_config.{key}" if isinstance(inner, dict) and key in inner else key
        found = cfg[key] if value is _UNSET else value
        shown = repr(found) if is_number(found) else json_kind(found)
        raise WeightsError(f"{file}: {where} must be {expected}, found {shown}")

    for key in _POSITIVE_INTS:
        if key in cfg and (cfg[key] is not None or key in _SIZES) and not (is_int(cfg[key]) and cfg[key] > 0):
            fail(key, "a positive integer")
    if (cfg.get("num_hidden_layers") or 0) > MAX_LAYERS:
        fail("num_hidden_layers", f"at most {MAX_LAYERS}")
    for key in _NUMBERS:
        if cfg.get(key) is not None and not is_number(cfg[key]):
            fail(key, "a number")
    for key in _STRINGS:
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            fail(key, "a string")
    if cfg.get("tie_word_embeddings") is not None and not isinstance(cfg["tie_word_embeddings"], bool):
        fail("tie_word_embeddings", "true or false")
    check_token_ids(cfg, file)
    layer_types = cfg.get("layer_types")
    if layer_types is not None and not (isinstance(layer_types, list) and all(isinstance(t, str) for t in layer_types)):
        fail("layer_types", "an array of strings")
    # RoPE: rope_scaling (transformers 4), rope_parameters (5: one, or one per layer type).
    for key in ("rope_scaling", "rope_parameters"):
        value = cfg.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            fail(key, "an object")
        for part in [value, *(v for v in value.values() if isinstance(v, dict))]:
            for sub in ("rope_type", "type"):
                if part.get(sub) is not None and not isinstance(part[sub], str):
                    fail(key, f"an object whose {sub} is a string", part[sub])
            if "factor" in part and not is_number(part["factor"]):   # null too: transformers needs one
                fail(key, "an object whose factor is a number", part["factor"])
            if part.get("rope_theta") is not None and not is_number(part["rope_theta"]):
                fail(key, "an object whose rope_theta is a number", part["rope_theta"])


def check_token_ids(data: dict, file: str) -> None:
    """bos/eos/pad_token_id: an integer or an array of integers (or null)."""
    for key in _TOKEN_IDS:
        value = data.get(key)
        if value is None or is_int(value) or (isinstance(value, list) and all(is_int(v) for v in value)):
            continue
        found = (f"an array holding {json_kind(next(v for v in value if not is_int(v)))}" if isinstance(value, list)
                 else json_kind(value))
        raise WeightsError(f"{file}: {key} must be an integer or an array of integers, found {found}")


# --- defaults -------------------------------------------------------------------------------

# What transformers uses when config.json leaves a field out (GemmaConfig, Gemma2Config,
# Gemma3TextConfig defaults): a missing field is not "no opinion", it is this value.
HF_DEFAULTS = {
    "gemma": {"rms_norm_eps": 1e-6, "rope_theta": 10_000.0, "hidden_act": "gelu_pytorch_tanh",
              "hidden_activation": None, "tie_word_embeddings": True, "rope_scaling": None},
    "gemma2": {"rms_norm_eps": 1e-6, "rope_theta": 10_000.0, "hidden_activation": "gelu_pytorch_tanh",
               "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "tie_word_embeddings": True, "rope_scaling": None},
    "gemma3": {"rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
               "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
               "sliding_window": 4096, "sliding_window_pattern": 6, "attn_logit_softcapping": None,
               "final_logit_softcapping": None, "tie_word_embeddings": True, "rope_scaling": None},
}


def config_value(config: dict, family: str | None, key: str):
    """(value transformers will use, whether config.json sets it)."""
    cfg = text_config(config)
    if key in cfg:
        return cfg[key], True
    return HF_DEFAULTS.get(family or "", {}).get(key), False


def shown(value, present: bool) -> str:
    """A config value in a message: its repr, or that it is absent and what runs instead."""
    return f"{value!r}" if present else f"absent (transformers' default {value!r})"


# --- RoPE -----------------------------------------------------------------------------------

_LAYER_TYPES = {"global": "full_attention", "local": "sliding_attention"}


@dataclass(frozen=True)
class Rope:
    """The RoPE one kind of layer gets: its base and its frequency scaling."""
    base: object                      # rope_theta as config.json gives it
    type: str = "default"             # "default" (none), "linear", ...
    factor: float = 1.0


def _rope(base, scaling) -> Rope:
    if not isinstance(scaling, dict):
        return Rope(base)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return Rope(base)
    return Rope(base, kind, float(scaling.get("factor", 1.0)))


def rope_by_layer_type(config: dict, family: str | None) -> dict[str, Rope]:
    """{"global": Rope, "local": Rope} as transformers will read config.json: transformers 5's
    `rope_parameters` (one per layer type, or one for all layers), else `rope_theta` and
    `rope_scaling` (Gemma 3: `rope_local_base_freq` for local layers, never scaled)."""
    cfg = text_config(config)
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        out = {}
        for kind, hf in _LAYER_TYPES.items():
            p = params.get(hf, params) if isinstance(params.get(hf), dict) else params
            out[kind] = _rope(p.get("rope_theta"), p)
        return out
    base = config_value(config, family, "rope_theta")[0]
    scaling = config_value(config, family, "rope_scaling")[0]
    out = {"global": _rope(base, scaling)}
    if family == "gemma3":
        out["local"] = Rope(config_value(config, family, "rope_local_base_freq")[0])
    else:
        out["local"] = out["global"]
    return out


# --- sliding window -------------------------------------------------------------------------

@dataclass(frozen=True)
class SlidingLayout:
    """Which layers slide and how far, as transformers reads config.json."""
    window: object            # the window local layers get, None for none
    window_present: bool      # whether config.json sets it (else transformers' default)
    window_field: str         # the field that decides it
    types: tuple              # per layer: "local" or "global"
    types_field: str | None   # the field that decides the pattern; None: it follows the window


def sliding_layout(config: dict, family: str | None) -> SlidingLayout:
    """The window and each layer's attention: `sliding_window`, and `layer_types` (4.53 and
    later), else Gemma 3's `sliding_window_pattern` (every n-th layer global), else Gemma 2's
    "even layers slide"."""
    cfg = text_config(config)
    n = int(cfg.get("num_hidden_layers") or 0)
    window, present = config_value(config, family, "sliding_window")
    if isinstance(cfg.get("layer_types"), list):
        names = {"sliding_attention": "local", "full_attention": "global"}
        return SlidingLayout(window, present, "sliding_window",
                             tuple(names.get(t, str(t)) for t in cfg["layer_types"]), "layer_types")
    if family == "gemma3":
        period, has_period = config_value(config, family, "sliding_window_pattern")
        period = int(period or 1)
        return SlidingLayout(window, present, "sliding_window",
                             tuple("global" if (i + 1) % period == 0 else "local" for i in range(n)),
                             "sliding_window_pattern" if has_period else "sliding_window_pattern (absent)")
    return SlidingLayout(window, present, "sliding_window",
                         tuple("local" if i % 2 == 0 else "global" for i in range(n)), "(Gemma 2: even layers slide)")


__all__ = [
    "ARCHITECTURES", "MODEL_TYPES", "CONFIG_FIELDS", "HF_DEFAULTS", "MAX_LAYERS", "Rope", "SlidingLayout",
    "check_config", "check_token_ids", "config_spec", "config_value", "family_of", "is_int",
    "is_number", "json_kind", "rope_by_layer_type", "shown", "size_differences", "sliding_layout",
    "spec_sizes", "text_config",
]
