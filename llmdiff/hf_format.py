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
    "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
}
# Family -> the `model_type`s of its config.json, the one llmdiff writes first. Gemma 3's
# multimodal checkpoints say "gemma3" and nest the language model's config in `text_config`.
MODEL_TYPES = {
    "gemma": ("gemma",), "gemma2": ("gemma2",), "gemma3": ("gemma3_text", "gemma3"),
    "llama": ("llama",), "qwen2": ("qwen2",), "qwen3": ("qwen3",), "mistral": ("mistral",), "phi3": ("phi3",),
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
_PHI3_INTS = ("original_max_position_embeddings",)   # LongRoPE's original context, top level
_NUMBERS = ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar",
            "attn_logit_softcapping", "final_logit_softcapping")
_STRINGS = ("model_type", "hidden_act", "hidden_activation", "torch_dtype", "dtype")
_BOOLEANS = ("tie_word_embeddings", "use_sliding_window")
# Numbers of a RoPE scaling object (Llama 3's adds its frequency bands to `factor`).
_ROPE_NUMBERS = ("factor", "rope_theta", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                 "attention_factor")
_ROPE_ARRAYS = ("short_factor", "long_factor")   # LongRoPE's, one number per frequency
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
    for key in _PHI3_INTS:
        if cfg.get(key) is not None and not (is_int(cfg[key]) and cfg[key] > 1):
            fail(key, "an integer above 1")
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
            for sub in _ROPE_ARRAYS:
                if part.get(sub) is not None and not (isinstance(part[sub], list) and all(map(is_number, part[sub]))):
                    fail(key, f"an object whose {sub} is an array of numbers", part[sub])


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
    # Phi3Config: no window unless config.json sets one (then on every layer); LongRoPE's
    # original context is the top-level `original_max_position_embeddings` (4096 when absent).
    "phi3": {"rms_norm_eps": 1e-5, "rope_theta": 10_000.0, "hidden_act": "silu", "tie_word_embeddings": False,
             "rope_scaling": None, "head_dim": None, "num_key_value_heads": None, "sliding_window": None,
             "original_max_position_embeddings": 4096, "max_position_embeddings": 4096},
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
    # rope_type longrope (Phi-3): (short_factor, long_factor, original context, attention factor);
    # `factor` is the context extension max_position_embeddings / original.
    longrope: tuple | None = None

    def describe(self) -> str:
        text = f"{self.type} scaling x{self.factor:g}"
        if self.llama3 is not None:
            text += " (low_freq_factor {}, high_freq_factor {}, original_max_position_embeddings {})".format(
                *(f"{v:g}" if is_number(v) else repr(v) for v in self.llama3))
        if self.longrope is not None:
            short, long, original, attention = self.longrope
            lists = [f"[{v[0]:g} .. {v[-1]:g}] ({len(v)})" if isinstance(v, tuple) and v and all(map(is_number, v))
                     else repr(v) for v in (short, long)]
            text += (f" (short_factor {lists[0]}, long_factor {lists[1]}, original_max_position_embeddings"
                     f" {original!r}, attention factor {f'{attention:.6g}' if is_number(attention) else None})")
        return text


def _longrope(scaling: dict, cfg: dict) -> tuple:
    """(short_factor, long_factor, original context, attention factor) as transformers reads a
    longrope scaling: the original context from the top-level `original_max_position_embeddings`
    first (Phi3Config always has one: 4096), else the scaling's, else max_position_embeddings;
    the attention factor from the scaling, else sqrt(1 + ln(factor) / ln(original)) with factor
    the scaling's, else max_position_embeddings / original (`_compute_longrope_parameters`)."""
    import math

    phi3 = cfg.get("model_type") == "phi3"
    longest = cfg.get("max_position_embeddings", 4096 if phi3 else None)
    original = cfg.get("original_max_position_embeddings",
                       4096 if phi3 else scaling.get("original_max_position_embeddings", longest))
    factors = [tuple(v) if isinstance(v, list) else v
               for v in (scaling.get("short_factor"), scaling.get("long_factor"))]
    factor, attention = scaling.get("factor"), scaling.get("attention_factor")
    if factor is None and is_number(longest) and is_number(original) and original > 0:
        factor = longest / original
    if attention is None and is_number(factor) and is_number(original) and original > 1:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return (*factors, original, attention), factor


def _rope(base, scaling, cfg: dict) -> Rope:
    if not isinstance(scaling, dict):
        return Rope(base)
    # transformers reads rope_type, else the older name `type` (4.43 and later; 5.x alike).
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    both = ((scaling["rope_type"], scaling["type"]) if scaling.get("rope_type") and scaling.get("type")
            and scaling["rope_type"] != scaling["type"] else None)
    if kind in ("su", "yarn") and cfg.get("model_type") == "phi3":   # Phi3Config's older names
        kind = "longrope"
    if kind == "default":
        return Rope(base, both_types=both)
    if kind == "longrope":
        longrope, factor = _longrope(scaling, cfg)
        return Rope(base, kind, float(factor) if is_number(factor) else factor, both_types=both, longrope=longrope)
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
        if spec.rope_longrope:
            short, long, original = spec.rope_longrope
            return Rope(base, "longrope", spec.max_positions / original,
                        longrope=(short, long, original, spec.longrope_attention_factor))
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
    if want.type == "longrope":   # the factor lists to float32 precision (transformers runs them in float32)
        if have.type != "longrope":
            return False
        (*lists, original, attention), (*wanted, want_original, want_attention) = have.longrope, want.longrope
        return (all(isinstance(h, tuple) and len(h) == len(w) and all(close(a, b, 1e-6) for a, b in zip(h, w))
                    for h, w in zip(lists, wanted))
                and close(original, want_original) and close(attention, want_attention))
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
    - Mistral: `sliding_window` (default 4096) on every layer, none when null; Phi-3 the same,
      none when absent;
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
    if family in ("mistral", "phi3"):   # MistralConfig ignores layer_types (with a warning), Phi3Config too
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
    "spec_from_config", "spec_rope", "spec_sizes", "text_config",
]


# --- a spec from config.json ----------------------------------------------------------------

# What a family fixes whatever its config.json says: the conventions of its published code.
# Gemma's GELU is the tanh approximation even where config.json says "gelu" (google/gemma-7b
# as first published): the oracle runs the family's convention, an implementation that honours
# the field runs another function, and that is a finding (LD301), not a different model.
_CONVENTIONS = ("activation", "norm_plus_one", "norm_scale_dtype", "embed_scale", "qkv_bias", "qk_norm",
                "post_attn_norm", "post_mlp_norm", "transpose_gating", "add_bos")


def _family_template(family: str):
    from llmdiff.spec import get_spec, model_names

    return next(s for s in map(get_spec, model_names()) if s.family == family)


def spec_from_config(config: dict, name: str, file: str = "config.json"):
    """The ModelSpec a checkpoint's config.json describes, as transformers reads it: the family
    from `model_type`, every size and architectural number from the config (transformers'
    defaults where a field is absent), the family's conventions (`_CONVENTIONS`) from its
    registered models. A config the oracle cannot run is a WeightsError naming the field."""
    check_config(config, file)
    cfg = text_config(config)
    family = family_of(config)
    if family is None:
        raise WeightsError(f"{file}: model_type {cfg.get('model_type')!r} is not a family llmdiff knows"
                           f" ({', '.join(sorted(_FAMILY_OF))})")
    template = _family_template(family)

    def value(key):
        return config_value(config, family, key)[0]

    def refuse(field, why):
        raise WeightsError(f"{file}: {field} {why}")

    sizes = config_sizes(config, family)
    for key in _SIZES:
        if not is_int(sizes[key]):
            refuse(key, "is missing; every model needs it")
    if sizes["num_attention_heads"] % sizes["num_key_value_heads"]:
        refuse("num_key_value_heads", f"{sizes['num_key_value_heads']} does not divide num_attention_heads"
                                      f" {sizes['num_attention_heads']}")
    if family not in ("gemma", "gemma2", "gemma3") and value("hidden_act") != "silu":
        refuse("hidden_act", f"{value('hidden_act')!r}: {ARCHITECTURES[family]} is SwiGLU (silu); the oracle runs no other")
    if family in ("llama", "mistral", "qwen3") and cfg.get("attention_bias"):
        refuse("attention_bias", "true (biases on q, k, v and o): the oracle has biases on q, k and v only (Qwen2)")
    if family in ("llama", "mistral") and cfg.get("mlp_bias"):
        refuse("mlp_bias", "true: the oracle's MLP has no biases")

    rope = rope_by_layer_type(config, family)
    fields = {}
    for kind, suffix in (("global", ""), ("local", "_local")):
        r = rope[kind]
        if not is_number(r.base):
            refuse("rope_theta", f"is {json_kind(r.base)}; RoPE needs a base")
        fields["rope_base" + suffix] = float(r.base)
        if r.type == "linear":
            fields["rope_scale" + suffix] = r.factor
        elif r.type == "llama3":
            if kind == "local" and family == "gemma3":
                refuse("rope_scaling", "llama3 on local layers: the oracle scales Gemma 3's global layers only")
            if not all(is_number(v) for v in r.llama3):
                refuse("rope_scaling", f"llama3 needs low_freq_factor, high_freq_factor and"
                                       f" original_max_position_embeddings, found {r.describe()}")
            fields["rope_llama3"] = (r.factor, *(float(v) if i < 2 else int(v) for i, v in enumerate(r.llama3)))
        elif r.type == "longrope":   # Phi-3 128k / 3.5: the same RoPE on every layer
            short, long, original, attention = r.longrope
            half = sizes["head_dim"] // 2 if is_int(sizes["head_dim"]) else None
            lists_fit = all(isinstance(f, tuple) and len(f) == half for f in (short, long))
            if not (is_int(original) and original > 1 and lists_fit):
                refuse("rope_scaling", f"longrope needs short_factor and long_factor of head_dim / 2 = {half} numbers"
                                       f" each and an original context, found {r.describe()}")
            fields["rope_longrope"] = (tuple(map(float, short)), tuple(map(float, long)), original)
            fields["longrope_attention_factor"] = attention
        elif r.type != "default":
            refuse("rope_scaling", f"rope_type {r.type!r}: the oracle runs default, linear, llama3 and longrope RoPE")
    params = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    partial = cfg.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        refuse("partial_rotary_factor", f"{partial!r}: the oracle rotates every feature of a head (1.0)")
    if fields.get("rope_llama3") and family == "gemma3":
        refuse("rope_scaling", "llama3 on Gemma 3: the oracle scales Gemma 3 linearly")

    layout = sliding_layout(config, family)
    types = tuple(layout.types)
    if len(types) != sizes["num_hidden_layers"]:
        refuse("layer_types", f"has {len(types)} entries for {sizes['num_hidden_layers']} layers")
    if set(types) - {"local", "global"}:
        refuse("layer_types", f"{sorted(set(types) - {'local', 'global'})}: the oracle knows full_attention and"
                              " sliding_attention")
    window = layout.window if "local" in types else None
    if "local" in types and not is_int(window):
        refuse("sliding_window", f"is {json_kind(window)} but layers slide ({layout.types_field or 'every layer'})")
    # A window config.json carries but switches off (Qwen: `use_sliding_window` false).
    carried = cfg.get("sliding_window")
    disabled = carried if family in ("qwen2", "qwen3") and "local" not in types and is_int(carried) else None

    eos = cfg.get("eos_token_id", template.eos_id)
    pad = cfg.get("pad_token_id") if "pad_token_id" in cfg else template.pad_id
    spec = dataclasses.replace(
        template, name=name,
        vocab_size=sizes["vocab_size"], hf_vocab_size=None, hidden_size=sizes["hidden_size"],
        num_layers=sizes["num_hidden_layers"], num_heads=sizes["num_attention_heads"],
        num_kv_heads=sizes["num_key_value_heads"], head_dim=sizes["head_dim"], mlp_dim=sizes["intermediate_size"],
        norm_eps=float(value("rms_norm_eps")),
        rope_base=fields["rope_base"], rope_base_local=fields["rope_base_local"],
        rope_scale=fields.get("rope_scale", 1.0), rope_scale_local=fields.get("rope_scale_local", 1.0),
        rope_llama3=fields.get("rope_llama3"), rope_longrope=fields.get("rope_longrope"),
        query_pre_attn_scalar=float(value("query_pre_attn_scalar") or 0) if family in ("gemma2", "gemma3") else 0.0,
        tie_embeddings=bool(value("tie_word_embeddings")),
        attention_types=types if "local" in types else (), sliding_window=window, disabled_sliding_window=disabled,
        attn_softcap=value("attn_logit_softcapping") if family in ("gemma2", "gemma3") else None,
        final_softcap=value("final_logit_softcapping") if family in ("gemma2", "gemma3") else None,
        max_positions=int(cfg.get("max_position_embeddings") or template.max_positions),
        pad_id=pad[0] if isinstance(pad, list) else pad,
        eos_id=eos[0] if isinstance(eos, list) and eos else (eos if is_int(eos) else template.eos_id),
        bos_id=cfg.get("bos_token_id") if is_int(cfg.get("bos_token_id")) else template.bos_id,
        tiny=False,
    )
    attention = fields.get("longrope_attention_factor")
    derived = spec.longrope_attention_factor
    if spec.rope_longrope and not (is_number(attention) and abs(attention - derived) <= 1e-9 * attention):
        refuse("rope_scaling", f"longrope's attention factor {attention!r} (from attention_factor or factor): the oracle"
                               f" derives it from max_position_embeddings / original_max_position_embeddings"
                               f" ({derived:.6g})")
    return spec
