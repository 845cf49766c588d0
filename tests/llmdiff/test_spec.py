import math
import os

import pytest

from llmdiff import inputs
from llmdiff.errors import UsageError
from llmdiff.references.gemma import llama3_rope_scales
from llmdiff.spec import (GEMMA_FAMILIES, capture_points, get_spec, model_names, pattern_period,
                          sqrt_rounds_differently_in_bf16)

GEMMA23 = [n for n in model_names() if get_spec(n).family in ("gemma2", "gemma3")]


def test_published_numbers():
    s = get_spec("gemma-7b")
    assert (s.vocab_size, s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.mlp_dim) == (
        256000, 3072, 28, 16, 16, 256, 24576)
    s = get_spec("gemma-2b")
    assert (s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.mlp_dim) == (
        2048, 18, 8, 1, 256, 16384)
    for name in model_names():
        s = get_spec(name)
        if s.family not in GEMMA_FAMILIES:
            continue
        assert (s.activation, s.norm_eps, s.tie_embeddings) == ("gelu_tanh", 1e-6, True)
        assert (s.pad_id, s.eos_id, s.bos_id) == (0, 1, 2)
        if s.family == "gemma":
            assert s.rope_base == 10000.0 and s.query_scale == 256 ** -0.5
            assert not (s.attention_types or s.attn_softcap or s.final_softcap or s.post_attn_norm
                        or s.post_mlp_norm or s.qk_norm or s.transpose_gating or s.hf_vocab_size)


# (V DeepMind, V HF, D, layers, N, K, H, F, window, query_pre_attn_scalar, RoPE scale on global layers)
# from the published HF config.json files and DeepMind's gemma/gm/nn/_gemma.py.
PUBLISHED = {
    "gemma-2-2b": (256128, 256000, 2304, 26, 8, 4, 256, 9216, 4096, 256, 1.0),
    "gemma-2-9b": (256128, 256000, 3584, 42, 16, 8, 256, 14336, 4096, 256, 1.0),
    "gemma-2-27b": (256128, 256000, 4608, 46, 32, 16, 128, 36864, 4096, 144, 1.0),
    "gemma-3-270m": (262144, 262144, 640, 18, 4, 1, 256, 2048, 512, 256, 1.0),
    "gemma-3-1b": (262144, 262144, 1152, 26, 4, 1, 256, 6912, 512, 256, 1.0),
    "gemma-3-4b": (262144, 262208, 2560, 34, 8, 4, 256, 10240, 1024, 256, 8.0),
    "gemma-3-12b": (262144, 262208, 3840, 48, 16, 8, 256, 15360, 1024, 256, 8.0),
    "gemma-3-27b": (262144, 262208, 5376, 62, 32, 16, 128, 21504, 1024, 168, 8.0),
}


# (V, D, layers, N, K, H, F, eps, RoPE base, tied, max positions) from each model's HF config.json.
LLAMA_LIKE = {
    "llama-3.1-8b": (128256, 4096, 32, 32, 8, 128, 14336, 1e-5, 500000, False, 131072),
    "llama-3.1-70b": (128256, 8192, 80, 64, 8, 128, 28672, 1e-5, 500000, False, 131072),
    "llama-3.1-405b": (128256, 16384, 126, 128, 8, 128, 53248, 1e-5, 500000, False, 131072),
    "llama-3.2-1b": (128256, 2048, 16, 32, 8, 64, 8192, 1e-5, 500000, True, 131072),
    "llama-3.2-3b": (128256, 3072, 28, 24, 8, 128, 8192, 1e-5, 500000, True, 131072),
    "qwen2.5-0.5b": (151936, 896, 24, 14, 2, 64, 4864, 1e-6, 1e6, True, 32768),
    "qwen2.5-1.5b": (151936, 1536, 28, 12, 2, 128, 8960, 1e-6, 1e6, True, 131072),
    "qwen2.5-3b": (151936, 2048, 36, 16, 2, 128, 11008, 1e-6, 1e6, True, 32768),
    "qwen2.5-7b": (152064, 3584, 28, 28, 4, 128, 18944, 1e-6, 1e6, False, 131072),
    "qwen2.5-14b": (152064, 5120, 48, 40, 8, 128, 13824, 1e-5, 1e6, False, 131072),
    "qwen2.5-32b": (152064, 5120, 64, 40, 8, 128, 27648, 1e-5, 1e6, False, 131072),
    "qwen2.5-72b": (152064, 8192, 80, 64, 8, 128, 29568, 1e-5, 1e6, False, 131072),
    "qwen3-0.6b": (151936, 1024, 28, 16, 8, 128, 3072, 1e-6, 1e6, True, 40960),
    "qwen3-1.7b": (151936, 2048, 28, 16, 8, 128, 6144, 1e-6, 1e6, True, 40960),
    "qwen3-4b": (151936, 2560, 36, 32, 8, 128, 9728, 1e-6, 1e6, True, 40960),
    "qwen3-8b": (151936, 4096, 36, 32, 8, 128, 12288, 1e-6, 1e6, False, 40960),
    "qwen3-14b": (151936, 5120, 40, 40, 8, 128, 17408, 1e-6, 1e6, False, 40960),
    "qwen3-32b": (151936, 5120, 64, 64, 8, 128, 25600, 1e-6, 1e6, False, 40960),
    "mistral-7b-v0.1": (32000, 4096, 32, 32, 8, 128, 14336, 1e-5, 10000, False, 32768),
    "mistral-7b-v0.3": (32768, 4096, 32, 32, 8, 128, 14336, 1e-5, 1e6, False, 32768),
}


@pytest.mark.parametrize("name", sorted(LLAMA_LIKE))
def test_llama_qwen_mistral_published_numbers(name):
    s = get_spec(name)
    assert (s.vocab_size, s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.mlp_dim,
            s.norm_eps, s.rope_base, s.tie_embeddings, s.max_positions) == LLAMA_LIKE[name]
    assert (s.activation, s.norm_plus_one, s.norm_scale_dtype, s.embed_scale) == ("silu", False, "compute", "none")
    assert s.qkv_bias == (s.family == "qwen2") and s.qk_norm == (s.family == "qwen3")
    assert s.add_bos == (s.family in ("llama", "mistral"))
    assert s.rope_llama3 == ({"llama-3.1": (8.0, 1.0, 4.0, 8192), "llama-3.2": (32.0, 1.0, 4.0, 8192)}[name[:9]]
                             if s.family == "llama" else None)
    assert (s.sliding_window, set(s.layer_types)) == ((4096, {"local"}) if name == "mistral-7b-v0.1" else (None, {"global"}))


# Phi-3: each repo's config.json (microsoft/Phi-3-mini-4k-instruct, -128k-instruct after its
# July 2024 update, Phi-3.5-mini-instruct): window, context, LongRoPE's original context and the
# ends of its factor lists.
PHI3 = {
    "phi-3-mini-4k-instruct": (2047, 4096, None),
    "phi-3-mini-128k-instruct": (262_144, 131_072, (4096, (1.1, 3.049999999999997), (1.0700000524520874, 64.76000213623047))),
    "phi-3.5-mini-instruct": (262_144, 131_072, (4096, (1.0, 2.8399994373321533), (1.0800000429153442, 64.83999633789062))),
}


@pytest.mark.parametrize("name", sorted(PHI3))
def test_phi3_published_numbers(name):
    s = get_spec(name)
    assert (s.family, s.vocab_size, s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.mlp_dim,
            s.norm_eps, s.rope_base, s.tie_embeddings) == ("phi3", 32064, 3072, 32, 32, 32, 96, 8192, 1e-5, 10_000.0, False)
    assert (s.activation, s.norm_plus_one, s.norm_scale_dtype, s.embed_scale) == ("silu", False, "compute", "none")
    assert (s.bos_id, s.eos_id, s.pad_id, s.hf_fused_projections, s.qkv_bias, s.qk_norm) == (1, 32000, 32000, True, False, False)
    window, context, longrope = PHI3[name]
    assert (s.sliding_window, s.max_positions, set(s.layer_types)) == (window, context, {"local"})
    if longrope is None:
        assert s.rope_longrope is None and s.longrope_attention_factor == 1.0
    else:
        short, long, original = s.rope_longrope
        assert original == longrope[0] and len(short) == len(long) == s.head_dim // 2
        assert (short[0], short[-1]) == longrope[1] and (long[0], long[-1]) == longrope[2]
        assert list(long) == sorted(long)   # published long factors grow towards the low frequencies
        assert s.longrope_attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_gemma2_gemma3_published_numbers(name):
    s = get_spec(name)
    assert (s.vocab_size, s.hf_vocab_size or s.vocab_size, s.hidden_size, s.num_layers, s.num_heads,
            s.num_kv_heads, s.head_dim, s.mlp_dim, s.sliding_window) == PUBLISHED[name][:9]
    assert s.query_scale == PUBLISHED[name][9] ** -0.5
    assert s.rope_scale == PUBLISHED[name][10] and s.rope_scale_local == 1.0
    assert s.post_attn_norm and s.post_mlp_norm
    if s.family == "gemma2":
        assert (s.attn_softcap, s.final_softcap, s.qk_norm) == (50.0, 30.0, False)
        assert s.rope_base == s.rope_base_local == 10_000.0
        assert s.attention_types == ("local", "global") * (s.num_layers // 2)  # local first
        assert s.transpose_gating == (name != "gemma-2-2b")
    else:
        assert (s.attn_softcap, s.final_softcap, s.qk_norm, s.transpose_gating) == (None, None, True, True)
        assert (s.rope_base, s.rope_base_local) == (1_000_000.0, 10_000.0)
        pattern = ("local",) * 5 + ("global",)
        assert s.attention_types == tuple(pattern[i % 6] for i in range(s.num_layers))


# DeepMind config field -> how to read ours. The attention types are compared by name.
_DEEPMIND_FIELDS = {
    "num_embed": "vocab_size", "embed_dim": "hidden_size", "hidden_dim": "mlp_dim",
    "num_heads": "num_heads", "head_dim": "head_dim", "num_kv_heads": "num_kv_heads",
    "final_logit_softcap": "final_softcap", "use_post_attn_norm": "post_attn_norm",
    "use_post_ffw_norm": "post_mlp_norm", "attn_logits_soft_cap": "attn_softcap",
    "sliding_window_size": "sliding_window", "transpose_gating_einsum": "transpose_gating",
    "use_qk_norm": "qk_norm", "local_base_frequency": "rope_base_local",
    "global_base_frequency": "rope_base", "local_scale_factor": "rope_scale_local",
    "global_scale_factor": "rope_scale",
}
_DEEPMIND_CLASSES = {
    "gemma-2-2b": "Gemma2_2B", "gemma-2-9b": "Gemma2_9B", "gemma-2-27b": "Gemma2_27B",
    "gemma-3-270m": "Gemma3_270M", "gemma-3-1b": "Gemma3_1B", "gemma-3-4b": "Gemma3_4B",
    "gemma-3-12b": "Gemma3_12B", "gemma-3-27b": "Gemma3_27B",
}


_READ_DEEPMIND_CONFIGS = """
import json, sys, types
# gemma.gm.ckpts fails to import with current kauldron releases (AbstractPartialLoader is
# gone) and _gemma.py imports it only for checkpoint paths: stand in an empty module for it.
class Anything:
    def __getattr__(self, name):
        return self
paths = types.ModuleType("gemma.gm.ckpts._paths")
paths.__getattr__ = lambda name: Anything()
ckpts = types.ModuleType("gemma.gm.ckpts")
ckpts._paths = paths
sys.modules.update({"gemma.gm.ckpts": ckpts, "gemma.gm.ckpts._paths": paths})
from gemma.gm.nn import _gemma
out = {}
for ours, cls in json.loads(sys.argv[1]).items():
    c = getattr(_gemma, cls).config
    row = {f: getattr(c, f) for f in json.loads(sys.argv[2])}
    row["attention_types"] = ["local" if t.name == "LOCAL_SLIDING" else "global" for t in c.attention_types]
    row["query_pre_attn_scalar"] = c.query_pre_attn_scalar()
    out[ours] = row
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def deepmind_configs():
    """DeepMind's configs, read by the deepmind virtualenv's interpreter (the extra lives there)."""
    import json
    import subprocess

    from llmdiff.runner import venv_python

    python = venv_python("deepmind")
    if python is None:
        pytest.skip("Google DeepMind's `gemma` is not installed "
                    "(python -m llmdiff.references.deepmind_gemma install)")
    proc = subprocess.run([python, "-c", _READ_DEEPMIND_CONFIGS, json.dumps(_DEEPMIND_CLASSES),
                           json.dumps(sorted(_DEEPMIND_FIELDS))], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(_DEEPMIND_CLASSES))
def test_specs_equal_deepmind_configs(name, deepmind_configs):
    """Field by field against Google DeepMind's gemma library, the reference for the numbers."""
    config = deepmind_configs[name]
    spec = get_spec(name)
    for dm_field, ours in _DEEPMIND_FIELDS.items():
        assert getattr(spec, ours) == config[dm_field], f"{name}: {ours} vs DeepMind {dm_field}"
    assert list(spec.layer_types) == config["attention_types"] and spec.num_layers == len(config["attention_types"])
    assert spec.query_scale == pytest.approx(config["query_pre_attn_scalar"], rel=1e-15)


@pytest.mark.parametrize("name", model_names())
def test_tiny_keeps_every_feature(name):
    full, tiny = get_spec(name), get_spec(name, tiny=True)
    # Four kv heads of `kv_groups` query heads each (16 in Llama 3.1 405B) make some wider.
    assert tiny.tiny and tiny.hidden_size <= max(512, 4 * tiny.kv_groups * 48) and tiny.num_layers >= 2
    assert tiny.kv_groups == full.kv_groups
    assert (tiny.num_kv_heads == 1) == (full.num_kv_heads == 1)
    assert (tiny.hidden_size == tiny.num_heads * tiny.head_dim) == (full.hidden_size == full.num_heads * full.head_dim)
    assert tiny.mlp_dim / tiny.hidden_size == full.mlp_dim / full.hidden_size
    assert sqrt_rounds_differently_in_bf16(tiny.hidden_size)
    # Gemma 2/3 features: the same ones, kept where they act.
    assert (tiny.family, tiny.attn_softcap, tiny.final_softcap, tiny.post_attn_norm, tiny.post_mlp_norm,
            tiny.qk_norm, tiny.rope_base, tiny.rope_base_local, tiny.rope_scale, tiny.rope_scale_local,
            tiny.transpose_gating) == (
        full.family, full.attn_softcap, full.final_softcap, full.post_attn_norm, full.post_mlp_norm,
        full.qk_norm, full.rope_base, full.rope_base_local, full.rope_scale, full.rope_scale_local,
        full.transpose_gating)
    assert (tiny.activation, tiny.norm_plus_one, tiny.norm_scale_dtype, tiny.embed_scale, tiny.qkv_bias,
            tiny.tie_embeddings, tiny.add_bos, tiny.norm_eps) == (
        full.activation, full.norm_plus_one, full.norm_scale_dtype, full.embed_scale, full.qkv_bias,
        full.tie_embeddings, full.add_bos, full.norm_eps)
    if full.rope_llama3:  # the same factors; a context the prompts go past; every band acts
        assert tiny.rope_llama3[:3] == full.rope_llama3[:3]
        assert tiny.rope_llama3[3] < max(len(t) for t in inputs.synthetic_prompts(tiny))
        scales = llama3_rope_scales(tiny.head_dim, tiny.rope_base, tiny.rope_llama3)
        factor = tiny.rope_llama3[0]
        assert (scales == 1).any() and (scales == factor).any() and ((scales > 1) & (scales < factor)).any()
    assert (tiny.query_scale == tiny.head_dim ** -0.5) == (full.query_scale == full.head_dim ** -0.5)
    assert (tiny.hf_vocab_size or tiny.vocab_size) - tiny.vocab_size == (
        (full.hf_vocab_size or full.vocab_size) - full.vocab_size)
    if full.attention_types:  # one whole period of the layer pattern, in order
        period = pattern_period(full.attention_types)
        assert tiny.attention_types == full.attention_types[:tiny.num_layers]
        assert tiny.num_layers == max(2, period)
        assert "local" in tiny.attention_types and ("global" in tiny.attention_types) == ("global" in full.layer_types)
        # a window the long default prompt goes past, so local layers really slide; one the
        # model's own context never reaches (Phi-3 128k's 262144) stays out of reach
        longest = max(len(t) for t in inputs.synthetic_prompts(tiny))
        assert (tiny.sliding_window < longest) == (full.sliding_window < full.max_positions)
        assert (tiny.sliding_window < tiny.max_positions) == (full.sliding_window < full.max_positions)
    if full.rope_longrope:  # the short prompt within the original context, the long one past it
        short, long, original = tiny.rope_longrope
        lengths = sorted(len(t) for t in inputs.synthetic_prompts(tiny))
        assert lengths[0] <= original < lengths[-1]
        assert len(short) == len(long) == tiny.head_dim // 2 and short != long
        for mine, published in zip((short, long), full.rope_longrope[:2]):
            assert set(mine) <= set(published) and (mine[0], mine[-1]) == (published[0], published[-1])
        assert tiny.max_positions / original == full.max_positions / full.rope_longrope[2]
        assert tiny.longrope_attention_factor > 1
    assert (tiny.rope_longrope is None) == (full.rope_longrope is None)
    assert tiny.hf_fused_projections == full.hf_fused_projections


def test_full_size_embedding_scale_rounds_in_bf16():
    assert sqrt_rounds_differently_in_bf16(get_spec("gemma-7b").hidden_size)  # 3072: 55.4256 vs 55.5
    assert not sqrt_rounds_differently_in_bf16(get_spec("gemma-2-2b").hidden_size)  # 2304 = 48^2


def test_sqrt_rounding_examples():
    assert sqrt_rounds_differently_in_bf16(768)   # 27.7128 vs 27.75
    assert not sqrt_rounds_differently_in_bf16(256)
    assert math.sqrt(3072) != 55.5


def test_unknown_model_suggests():
    with pytest.raises(UsageError, match=r"unknown model 'gema-2b'; did you mean gemma-2b"):
        get_spec("gema-2b")


def test_capture_points_post_norms_where_they_exist():
    points = capture_points(get_spec("gemma-2-2b", tiny=True))
    layer0 = [p for p in points if p.startswith("L0.")]
    assert layer0 == ["L0.attn_norm", "L0.q", "L0.k", "L0.v", "L0.attn_out", "L0.post_attn_norm",
                      "L0.resid_mid", "L0.mlp_norm", "L0.mlp_gate", "L0.mlp_up", "L0.mlp_act",
                      "L0.mlp_out", "L0.post_mlp_norm", "L0.out"]
    assert not any("post_" in p for p in capture_points(get_spec("gemma-7b", tiny=True)))


def test_capture_points_order():
    points = capture_points(get_spec("gemma-7b", tiny=True))
    assert points[0] == "embed" and points[-2:] == ["final_norm", "logits"]
    assert points[1:13] == ["L0.attn_norm", "L0.q", "L0.k", "L0.v", "L0.attn_out", "L0.resid_mid",
                            "L0.mlp_norm", "L0.mlp_gate", "L0.mlp_up", "L0.mlp_act", "L0.mlp_out", "L0.out"]


@pytest.mark.parametrize("name", ["gemma-7b", "llama-3.1-8b", "qwen2.5-0.5b"])
def test_synthetic_prompts_start_with_bos_where_the_family_adds_one(name):
    spec = get_spec(name, tiny=True)
    for prompt, n in zip(inputs.synthetic_prompts(spec), inputs.DEFAULT_LENGTHS):
        assert len(prompt) == n and (prompt[0] == spec.bos_id) == spec.add_bos
        assert spec.bos_id not in prompt[1:]
