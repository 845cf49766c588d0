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


def config_sizes(config: dict, family: str | None) -> dict:
    """The CONFIG_FIELDS values transformers builds the model with: config.json's, else the
    family's default; head_dim and num_key_value_heads that are null or default to nothing are
    derived (hidden / heads, heads), as the config classes do. vocab_size has no default."""
    cfg = text_config(config)
    sizes = {key: config_value(config, family, key)[0] if key != "vocab_size" else cfg.get(key)
             for key in CONFIG_FIELDS}
    try:
        if sizes["head_dim"] is None:
            sizes["head_dim"] = sizes["hidden_size"] // sizes["num_attention_heads"]
        if sizes["num_key_value_heads"] is None:
            sizes["num_key_value_heads"] = sizes["num_attention_heads"]
    except TypeError:   # hidden_size or num_attention_heads absent: nothing to derive from
        pass
    return sizes


def size_differences(config: dict, spec) -> dict:
    """{key: {"config": value, "spec": value}} for each size but vocab_size (whose rows are
    `vocab-size-mismatch`'s) that config.json, read as transformers reads it, does not share
    with `spec`."""
    have, want = config_sizes(config, spec.family), spec_sizes(spec)
    return {key: {"config": have[key], "spec": want[key]} for key in CONFIG_FIELDS
            if key != "vocab_size" and have[key] != want[key]}


def config_spec(config: dict, family: str | None):
    """A ModelSpec built from config.json's own sizes, with the family's architecture (q/k norms,
    qkv biases, post norms, from its registered specs), to derive the tensor shapes it implies.
    The head is tied: whether `lm_head` is there is `tied-embedding-inconsistent`'s to judge.
    None for an unknown family or sizes that are missing."""
    from llmdiff.spec import get_spec, model_names

    if family is None:
        return None
    template = next((s for s in map(get_spec, model_names()) if s.family == family), None)
    sizes = config_sizes(config, family)
    if template is None or any(not isinstance(sizes[k], int) for k in CONFIG_FIELDS):
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
_NON_NEGATIVE_INTS = ("max_window_layers",)
_NUMBERS = ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar",
            "attn_logit_softcapping", "final_logit_softcapping")
_STRINGS = ("model_type", "hidden_act", "hidden_activation", "torch_dtype", "dtype")
_BOOLEANS = ("tie_word_embeddings", "use_sliding_window")
# Numbers of a RoPE scaling object (Llama 3's adds its frequency bands to `factor`).
_ROPE_NUMBERS = ("factor", "rope_theta", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
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
    for key in _NON_NEGATIVE_INTS:
        if cfg.get(key) is not None and not (is_int(cfg[key]) and cfg[key] >= 0):
            fail(key, "a non-negative integer")
    if (cfg.get("num_hidden_layers") or 0) > MAX_LAYERS:
        fail("num_hidden_layers", f"at most {MAX_LAYERS}")
    for key in _NUMBERS:
        if cfg.get(key) is not None and not is_number(cfg[key]):
            fail(key, "a number")
    for key in _STRINGS:
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            fail(key, "a string")
    for key in _BOOLEANS:
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            fail(key, "true or false")
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
            for sub in _ROPE_NUMBERS[1:]:
                if part.get(sub) is not None and not is_number(part[sub]):
                    fail(key, f"an object whose {sub} is a number", part[sub])


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

# What transformers uses when config.json leaves a field out: the defaults of each family's
# config class (GemmaConfig, Gemma2Config, Gemma3TextConfig, LlamaConfig, Qwen2Config,
# Qwen3Config, MistralConfig). A missing field is not "no opinion", it is this value. None for
# head_dim / num_key_value_heads: derived from the other sizes (`config_sizes`). Left out where
# the default changed between releases: Gemma2Config's num_key_value_heads (16 in 4.42, 4 in 5.x).
HF_DEFAULTS = {
    "gemma": {"rms_norm_eps": 1e-6, "rope_theta": 10_000.0, "hidden_act": "gelu_pytorch_tanh",
              "hidden_activation": None, "tie_word_embeddings": True, "rope_scaling": None,
              "head_dim": 256, "num_key_value_heads": 16},
    "gemma2": {"rms_norm_eps": 1e-6, "rope_theta": 10_000.0, "hidden_activation": "gelu_pytorch_tanh",
               "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "tie_word_embeddings": True, "rope_scaling": None,
               "head_dim": 256},
    "gemma3": {"rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
               "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
               "sliding_window": 4096, "sliding_window_pattern": 6, "attn_logit_softcapping": None,
               "final_logit_softcapping": None, "tie_word_embeddings": True, "rope_scaling": None,
               "head_dim": 256, "num_key_value_heads": 4},
    # Llama-like: SwiGLU read from `hidden_act` only, untied heads, eps 1e-6 whatever the model.
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10_000.0, "hidden_act": "silu", "tie_word_embeddings": False,
              "rope_scaling": None, "head_dim": None, "num_key_value_heads": None},
    "qwen2": {"rms_norm_eps": 1e-6, "rope_theta": 10_000.0, "hidden_act": "silu", "tie_word_embeddings": False,
              "rope_scaling": None, "head_dim": None, "num_key_value_heads": 32, "use_sliding_window": False,
              "sliding_window": 4096, "max_window_layers": 28},
    "qwen3": {"rms_norm_eps": 1e-6, "rope_theta": 10_000.0, "hidden_act": "silu", "tie_word_embeddings": False,
              "rope_scaling": None, "head_dim": 128, "num_key_value_heads": 32, "use_sliding_window": False,
              "sliding_window": 4096, "max_window_layers": 28},
    # Mistral slides a 4096 window on every layer unless config.json says null (v0.3 does).
    "mistral": {"rms_norm_eps": 1e-6, "rope_theta": 10_000.0, "hidden_act": "silu", "tie_word_embeddings": False,
                "rope_scaling": None, "head_dim": None, "num_key_value_heads": 8, "sliding_window": 4096},
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
    type: str = "default"             # "default" (none), "linear", "llama3", ...
    factor: float = 1.0
    llama3: tuple | None = None       # rope_type llama3: (low_freq_factor, high_freq_factor, original context)
    both_types: tuple | None = None   # (rope_type, type) when the scaling names two different types

    def describe(self) -> str:
        text = f"{self.type} scaling x{self.factor:g}"
        if self.llama3 is not None:
            text += " (low_freq_factor {}, high_freq_factor {}, original_max_position_embeddings {})".format(
                *(f"{v:g}" if is_number(v) else repr(v) for v in self.llama3))
        return text


def _rope(base, scaling, cfg: dict) -> Rope:
    if not isinstance(scaling, dict):
        return Rope(base)
    # transformers reads rope_type, else the older name `type` (4.43 and later; 5.x alike).
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    both = ((scaling["rope_type"], scaling["type"]) if scaling.get("rope_type") and scaling.get("type")
            and scaling["rope_type"] != scaling["type"] else None)
    if kind == "default":
        return Rope(base, both_types=both)
    llama3 = None
    if kind == "llama3":   # 5.x: an absent original context is max_position_embeddings
        original = scaling.get("original_max_position_embeddings",
                               cfg.get("original_max_position_embeddings", cfg.get("max_position_embeddings")))
        llama3 = (scaling.get("low_freq_factor"), scaling.get("high_freq_factor"), original)
    return Rope(base, kind, float(scaling.get("factor", 1.0)), llama3, both)


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
            out[kind] = _rope(p.get("rope_theta"), p, cfg)
        return out
    base = config_value(config, family, "rope_theta")[0]
    scaling = config_value(config, family, "rope_scaling")[0]
    out = {"global": _rope(base, scaling, cfg)}
    if family == "gemma3":
        out["local"] = Rope(config_value(config, family, "rope_local_base_freq")[0])
    else:
        out["local"] = out["global"]
    return out


def spec_rope(spec) -> dict[str, Rope]:
    """{"global": Rope, "local": Rope} of a spec, in the terms of `rope_by_layer_type`."""
    def rope(base, scale):
        if spec.rope_llama3:
            factor, *bands = spec.rope_llama3
            return Rope(base, "llama3", float(factor), tuple(bands))
        return Rope(base, "linear", scale) if scale != 1 else Rope(base)
    return {"global": rope(spec.rope_base, spec.rope_scale), "local": rope(spec.rope_base_local, spec.rope_scale_local)}


def same_rope(have: Rope, want: Rope) -> bool:
    """Whether transformers runs `want` from `have` (no scaling is linear scaling by 1)."""
    import math

    def close(a, b, rel_tol=1e-9):
        return is_number(a) and math.isclose(a, b, rel_tol=rel_tol)

    if not (close(have.base, want.base) and close(have.factor, want.factor, 1e-9)):
        return False
    if want.type == "llama3":
        return have.type == "llama3" and all(close(a, b) for a, b in zip(have.llama3, want.llama3))
    return have.type in ("default", "linear")


# --- sliding window -------------------------------------------------------------------------

@dataclass(frozen=True)
class SlidingLayout:
    """Which layers slide and how far, as transformers reads config.json."""
    window: object            # the window sliding layers get; None: no layer slides
    types: tuple              # per layer: "local" (sliding) or "global"
    types_field: str | None   # the field that decides the pattern; None: it follows the window
    field: str                # the field that decides the window, its value and whether it is set
    value: object
    present: bool
    note: str = ""            # what else decides it, for a message


def sliding_layout(config: dict, family: str | None) -> SlidingLayout:
    """The window and each layer's attention, per family:

    - Gemma 2 / 3: `sliding_window`, and `layer_types` (4.53 and later), else Gemma 3's
      `sliding_window_pattern` (every n-th layer global), else Gemma 2's "even layers slide";
    - Mistral: `sliding_window` (default 4096) on every layer, none when null;
    - Qwen 2 / 3: `sliding_window` only with `use_sliding_window` (default false), on the layers
      `layer_types` names, else on layers from `max_window_layers` (default 28) on;
    - Gemma 1, Llama: no sliding window (a `sliding_window` key is ignored).
    """
    cfg = text_config(config)
    n = int(cfg.get("num_hidden_layers") or 0)
    window, present = config_value(config, family, "sliding_window")
    names = {"sliding_attention": "local", "full_attention": "global"}
    listed = tuple(names.get(t, str(t)) for t in cfg["layer_types"]) if isinstance(cfg.get("layer_types"), list) else None
    if family in ("gemma2", "gemma3"):
        if listed is not None:
            types, field = listed, "layer_types"
        elif family == "gemma3":
            period, has_period = config_value(config, family, "sliding_window_pattern")
            period = int(period or 1)
            types = tuple("global" if (i + 1) % period == 0 else "local" for i in range(n))
            field = "sliding_window_pattern" if has_period else "sliding_window_pattern (absent)"
        else:
            types, field = tuple("local" if i % 2 == 0 else "global" for i in range(n)), "(Gemma 2: even layers slide)"
        return SlidingLayout(window, types, field, "sliding_window", window, present)
    if family == "mistral":   # MistralConfig ignores layer_types (with a warning)
        return SlidingLayout(window, (("global", "local")[window is not None],) * n, None, "sliding_window",
                             window, present)
    if family in ("qwen2", "qwen3"):
        use, use_present = config_value(config, family, "use_sliding_window")
        window = window if use else None
        note = f" (sliding_window {window!r})" if use else ""
        if listed is not None:
            types, field = tuple(t if window is not None else "global" for t in listed), "layer_types"
        else:
            first, has_first = config_value(config, family, "max_window_layers")
            types = tuple("local" if window is not None and i >= (first or 0) else "global" for i in range(n))
            field = "max_window_layers" if has_first else "max_window_layers (absent)"
        return SlidingLayout(window, types, field, "use_sliding_window", use, use_present, note)
    return SlidingLayout(None, ("global",) * n, None, "sliding_window", None, False)


__all__ = [
    "ARCHITECTURES", "MODEL_TYPES", "CONFIG_FIELDS", "HF_DEFAULTS", "MAX_LAYERS", "Rope", "SlidingLayout",
    "check_config", "check_token_ids", "config_sizes", "config_spec", "config_value", "family_of", "is_int",
    "is_number", "json_kind", "rope_by_layer_type", "same_rope", "shown", "size_differences", "sliding_layout",
    "spec_rope", "spec_sizes", "text_config",
]
