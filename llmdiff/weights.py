"""The canonical weight set of a run: seeded random weights, or a local checkpoint.

Random weights are deterministic per tensor name (the same name and seed give the same
numbers whatever else the model holds), have realistic scale, non-zero norm scales, and
blocks strong enough that the model does not just echo its input token (random tied-embedding
models tend to, and then top-1 agreement means nothing). Every value is a bfloat16 number,
so float32 and bfloat16 runs start from the very same weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from llmdiff import convert, hf_format, safetensors_file
from llmdiff.errors import WeightsError
from llmdiff.spec import LLAMA_LIKE_FAMILIES, ModelSpec

# Residual-branch gain, as a fraction of sqrt(D): with tied embeddings a token's own logit
# gets sqrt(D) * |e|^2 from the embedding left in the residual stream, so the blocks must add
# more than that for the model to predict anything but its input (measured: gain 2 left 84%
# of positions of tiny gemma-7b predicting their own token; sqrt(D)/1.5 leaves under 20%).
_OUT_GAIN_PER_SQRT_D = 1 / 1.5


def tensor_std(spec: ModelSpec, name: str) -> float:
    """The standard deviation of random tensor `name` (canonical name)."""
    D, F, H, N = spec.hidden_size, spec.mlp_dim, spec.head_dim, spec.num_heads
    gain = _OUT_GAIN_PER_SQRT_D * D ** 0.5
    kind = name.split(".")[-1]
    if spec.tiny and spec.final_softcap and kind == "final_norm":
        # Logits of tens, where the final soft-cap (30) bends them even in bfloat16: a
        # random-signed scale of about 16 on the normalised state (a released model's logits
        # reach the cap; a tiny random one's, of about 1, would not).
        return 16.0
    if kind.endswith("norm"):
        return 0.25                                  # scale is (1 + w): around 1, never all 1
    if kind == "o":
        return gain * (N * H) ** -0.5
    if kind == "down":
        return gain * F ** -0.5
    return D ** -0.5                                 # embed (times sqrt(D) at the input), q, k, v, gate, up


# --- One generator, three frameworks ---------------------------------------------------------
# Element j of tensor `name` is a function of (seed, name, j) alone: an integer hash of j, made a
# uniform odd integer u in (-2**24, 2**24), times a float32 constant, rounded to bfloat16. Every
# step is exact or correctly rounded in numpy, torch and XLA alike (integer ops on int64 that
# never overflow, one float32 multiply, round-to-nearest-even), so a worker can make full-size
# weights on its own device, with its own framework, and get the very bits numpy makes here.

_MASK32 = 0xFFFFFFFF
_MUL = 0x45D9F3B                                     # < 2**27: x * _MUL stays below 2**59
CHUNK = 1 << 25                                      # elements per step: bounded temporaries


def _hash32(x):
    """A 32-bit integer hash of int64 values in [0, 2**32); operators only, so any array type."""
    x = (((x >> 16) ^ x) * _MUL) & _MASK32
    x = (((x >> 16) ^ x) * _MUL) & _MASK32
    return (x >> 16) ^ x


def _key(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little")


def _unit(spec: ModelSpec, name: str) -> np.float32:
    """float32 c with c * u uniform of the tensor's std (u odd in (-2**24, 2**24))."""
    return np.float32(tensor_std(spec, name) * 3 ** 0.5 / 2 ** 24)


def _odd_uniform(idx, key: int):
    """Odd integers in (-2**24, 2**24) from element indices (int64 arrays of any framework)."""
    h = _hash32(_hash32(idx) ^ key)
    return (h >> 8) * 2 - (2 ** 24 - 1)


def _zero_rows(spec: ModelSpec, name: str) -> int | None:
    """Rows from which `embed` is zero: DeepMind's padding rows no text id reaches (Gemma 2),
    so that the HF table, which lacks them, holds the same model."""
    if name == "embed" and spec.text_vocab_size < spec.vocab_size:
        return spec.text_vocab_size
    return None


# Elements a step of a host thread takes, per thread at work. Each thread makes one contiguous
# range through two scratch arrays, about 25 numpy calls a step, and each call takes the GIL
# back: the more threads queue for it, the longer a step must be, and the shorter, the better it
# stays in the core's cache. Measured (bench/RESULTS.md), GB/s of float32 by step: this
# project's 2 cores 0.97 / 1.42 / 1.31 / 0.92 at 2**16 / 2**17 / 2**18 / 2**20; the H200's
# 16-core host 0.95 / 1.67 / 3.24 / 3.59 / 2.52 at 2**17 / 2**18 / 2**19 / 2**20 / 2**21.
_HOST_BLOCK = 1 << 16
_HOST_STEP_MAX = 1 << 20


def _hash32_inplace(x: np.ndarray, tmp: np.ndarray) -> None:
    """`_hash32` on uint32 in place: a uint32 product wraps modulo 2**32, which is the `& _MASK32`
    of the int64 form, so the bits are the same, with half the memory traffic and no temporaries."""
    for _ in range(2):
        np.right_shift(x, 16, out=tmp)
        np.bitwise_xor(x, tmp, out=x)
        np.multiply(x, np.uint32(_MUL), out=x)
    np.right_shift(x, 16, out=tmp)
    np.bitwise_xor(x, tmp, out=x)


def _host_range(out: np.ndarray, lo: int, hi: int, key: int, c: np.float32, step: int) -> None:
    """Elements lo .. hi of a tensor of the seeded weights into `out` (flat float32), in steps
    of `step` through two scratch arrays, the last operations in `out` itself."""
    n = min(step, hi - lo)
    if n <= 0:
        return
    base, scratch, tmp = np.arange(n, dtype=np.uint32), np.empty(n, np.uint32), np.empty(n, np.uint32)
    for start in range(lo, hi, n):
        m = min(n, hi - start)
        x, t = scratch[:m], tmp[:m]
        np.add(base[:m], np.uint32(start), out=x)    # the element indices (< 2**32)
        _hash32_inplace(x, t)
        np.bitwise_xor(x, np.uint32(key), out=x)
        _hash32_inplace(x, t)
        np.right_shift(x, 8, out=x)                  # h < 2**24
        v = x.view(np.int32)
        np.left_shift(v, 1, out=v)                   # 2h - (2**24 - 1): odd, |.| < 2**24
        np.subtract(v, np.int32(2 ** 24 - 1), out=v)
        f = out[start:start + m]
        np.multiply(v, c, out=f, dtype=np.float32)   # exact in float32, then one rounding
        # To the nearest bfloat16, ties to even, in float32's bits (finite values: `to_bf16_values`)
        u = f.view(np.uint32)
        np.right_shift(u, 16, out=t)
        np.bitwise_and(t, np.uint32(1), out=t)
        np.add(u, np.uint32(0x7FFF), out=u)
        np.add(u, t, out=u)
        np.bitwise_and(u, np.uint32(0xFFFF0000), out=u)


def generate_numpy(spec: ModelSpec, name: str, shape, seed: int = 0) -> np.ndarray:
    """Tensor `name` of the seeded random weights, float32 holding bfloat16 values: the
    `_odd_uniform` generator in uint32, in place, one contiguous range a conversion thread
    (`_pool`; numpy releases the GIL), for the very bits the torch and JAX forms make
    (tests/llmdiff/test_weights.py)."""
    size = int(np.prod(shape, dtype=np.int64))
    if size >= 2 ** 32:
        raise WeightsError(f"{name}: {size} elements; the generator indexes at most 2**32")
    key, c = _key(seed, name), _unit(spec, name)
    out = np.empty(size, np.float32)
    threads = max(1, min(_threads(), size // _HOST_BLOCK))
    step = min(_HOST_STEP_MAX, _HOST_BLOCK * max(2, threads))
    bounds = [size * k // threads for k in range(threads + 1)]
    ranges = [(bounds[k], bounds[k + 1]) for k in range(threads)]
    if threads == 1:
        _host_range(out, *ranges[0], key, c, step)
    else:
        list(_pool().map(lambda r: _host_range(out, *r, key, c, step), ranges))
    out = out.reshape(shape)
    if (row := _zero_rows(spec, name)) is not None:
        out[row:] = 0.0
    return out


def generate_torch(spec: ModelSpec, name: str, shape, seed: int = 0, device="cpu", dtype=None):
    """`generate_numpy` in torch, on `device`: the same bits, cast to `dtype` (exactly)."""
    import torch

    size = int(np.prod(shape, dtype=np.int64))
    key = _key(seed, name)
    c = torch.tensor(_unit(spec, name), dtype=torch.float32, device=device)
    out = torch.empty(size, dtype=torch.bfloat16, device=device)
    for lo in range(0, size, CHUNK):
        idx = torch.arange(lo, min(size, lo + CHUNK), dtype=torch.int64, device=device)
        out[lo:lo + len(idx)] = (_odd_uniform(idx, key).to(torch.float32) * c).to(torch.bfloat16)
    out = out.reshape(tuple(shape)).to(dtype or torch.float32)
    if (row := _zero_rows(spec, name)) is not None:
        out[row:] = 0
    return out


def generate_jax(spec: ModelSpec, name: str, shape, seed: int = 0, dtype="float32"):
    """`generate_numpy` in JAX, on the default device, cast to `dtype` (exactly): one jitted
    step a chunk (`_jax_chunk`), so a model's weights compile a handful of steps, not a dozen
    eager operations per tensor shape (about 100 compiles, 4 s of a cold gemma-7b run). In
    uint32, as on the host: the same bits with JAX's 64-bit types off (DeepMind's gemma runs
    with them off) or on (the oracle)."""
    import jax.numpy as jnp

    size = int(np.prod(shape, dtype=np.int64))
    if size >= 2 ** 32:
        raise WeightsError(f"{name}: {size} elements; the generator indexes at most 2**32")
    key, c = jnp.uint32(_key(seed, name)), jnp.asarray(_unit(spec, name), jnp.float32)
    step = min(CHUNK, 1 << max(0, size - 1).bit_length())   # a power of two: few sizes to compile
    parts = [_jax_chunk(step)(jnp.uint32(lo), key, c) for lo in range(0, size, step)]
    out = (jnp.concatenate(parts) if len(parts) > 1 else parts[0])[:size].reshape(tuple(shape)).astype(dtype)
    if (row := _zero_rows(spec, name)) is not None:
        out = out.at[row:].set(0)
    return out


@functools.lru_cache(maxsize=None)
def _jax_chunk(n: int):
    """f(lo, key, c): elements lo .. lo + n of a tensor of the seeded weights, bfloat16, in one
    fused step: `_odd_uniform`'s operations in uint32 (a product wraps modulo 2**32, which is
    its `& _MASK32`; indices past the tensor's end wrap too, and are cut), so the same bits."""
    import jax
    import jax.numpy as jnp

    def hash32(x):   # `_hash32` without its mask: a uint32 (and 0xFFFFFFFF is no int32)
        for _ in range(2):
            x = ((x >> 16) ^ x) * jnp.uint32(_MUL)
        return (x >> 16) ^ x

    def f(lo, key, c):
        h = hash32(hash32(lo + jnp.arange(n, dtype=jnp.uint32)) ^ key)
        v = (h >> 8).astype(jnp.int32) * 2 - (2 ** 24 - 1)   # odd, |v| < 2**24: exact in float32
        return (v.astype(jnp.float32) * c).astype(jnp.bfloat16)

    return jax.jit(f)


def to_bf16_values(a: np.ndarray) -> np.ndarray:
    """Round to the nearest bfloat16 number, kept as float32 (exactly representable)."""
    import ml_dtypes

    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def random_weights(spec: ModelSpec, seed: int = 0, progress=None) -> dict[str, np.ndarray]:
    """Every canonical tensor, made on the host. `progress(str)`, if given, hears how far it is
    at most every 2 s (a full-size model is billions of values: minutes on a small machine)."""
    import time

    shapes = convert.canonical_shapes(spec)
    total = sum(int(np.prod(s)) for s in shapes.values())
    out, done, t0, said = {}, 0, time.perf_counter(), time.perf_counter()
    for i, (name, shape) in enumerate(shapes.items()):
        out[name] = generate_numpy(spec, name, shape, seed)
        done += out[name].size
        now = time.perf_counter()
        if progress is not None and now - said >= 2.0:
            said = now
            progress(f"weights: {i + 1}/{len(shapes)} tensors, {done / 1e9:.2f} of {total / 1e9:.2f} billion values"
                     f" ({done / (now - t0) / 1e6:.0f} M values/s)")
    return out


# --- Hugging Face checkpoints -------------------------------------------------------------

def hf_config(spec: ModelSpec, dtype: str = "bfloat16") -> dict:
    """A config.json for GemmaForCausalLM (transformers 4.38 and later), Gemma2ForCausalLM
    (4.42 and later) or Gemma3ForCausalLM, the text-only Gemma 3 (4.50 and later).

    Both `hidden_act` and `hidden_activation` say tanh GELU: 4.38.0 read `hidden_act`
    (exact GELU by default, the original bug), later releases prefer `hidden_activation`.
    Every Gemma 2/3 number is written out: HF's defaults silently differ from most models
    (Gemma 2 `sliding_window=4096`, softcaps 50/30, `query_pre_attn_scalar=256`, no RoPE scaling).
    """
    if spec.family not in hf_format.ARCHITECTURES:
        raise WeightsError(f"{spec.name}: no HF config for family {spec.family!r}")
    config = {
        "architectures": [hf_format.ARCHITECTURES[spec.family]],
        "model_type": hf_format.MODEL_TYPES[spec.family][0],
        **hf_format.spec_sizes(spec),
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_base,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pad_token_id": spec.pad_id,
        "eos_token_id": spec.eos_id,
        "bos_token_id": spec.bos_id,
        "tie_word_embeddings": spec.tie_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if spec.family == "gemma":
        return config
    if spec.family in LLAMA_LIKE_FAMILIES:
        return _llama_like_config(spec, config)
    hf_types = [{"local": "sliding_attention", "global": "full_attention"}[t] for t in spec.layer_types]
    config.update({
        "query_pre_attn_scalar": int(spec.query_pre_attn_scalar or spec.head_dim),
        "sliding_window": spec.sliding_window,
        # Which layers slide. Releases before `layer_types` (Gemma 2 up to 4.52) hard-code
        # "even layers slide", Gemma 3 up to 4.52 `sliding_window_pattern`; checked below.
        "layer_types": hf_types,
        "attn_logit_softcapping": spec.attn_softcap,
        "final_logit_softcapping": spec.final_softcap,
    })
    if spec.family == "gemma2":
        if spec.rope_base_local != spec.rope_base or spec.rope_scale != 1 or spec.rope_scale_local != 1:
            raise WeightsError(f"{spec.name}: HF Gemma 2 has one RoPE for every layer")
        if spec.attention_types and list(spec.attention_types) != [
                ("local", "global")[i % 2] for i in range(spec.num_layers)]:
            raise WeightsError(f"{spec.name}: HF Gemma 2 before 4.53 only knows alternating layers")
        config["cache_implementation"] = "hybrid"
        return config
    # Gemma 3 text-only. `rope_theta` is the global base, `rope_local_base_freq` the local one,
    # `rope_scaling` applies to global layers only: the 4.50 names, which 5.x still reads into
    # `rope_parameters = {"full_attention": ..., "sliding_attention": ...}`.
    if spec.rope_scale_local != 1:
        raise WeightsError(f"{spec.name}: HF Gemma 3 cannot scale RoPE on local layers")
    period = spec_period(spec)
    config.update({
        "rope_local_base_freq": spec.rope_base_local,
        "rope_scaling": ({"rope_type": "linear", "factor": spec.rope_scale}
                         if spec.rope_scale != 1 else None),
        "sliding_window_pattern": period,
        "cache_implementation": "hybrid",
    })
    return config


def _llama_like_config(spec: ModelSpec, gemma: dict) -> dict:
    """LlamaForCausalLM (4.40 and later: `llama3` RoPE from 4.43), Qwen2ForCausalLM,
    Qwen3ForCausalLM (4.51 and later), MistralForCausalLM, Phi3ForCausalLM (4.40 and later), as
    their published config.json."""
    architecture = hf_format.ARCHITECTURES[spec.family]
    config = {k: v for k, v in gemma.items() if k not in ("hidden_activation",)}
    config.update({"hidden_act": "silu", "attention_bias": spec.qkv_bias})
    if spec.rope_base_local != spec.rope_base or spec.rope_scale != 1 or spec.rope_scale_local != 1:
        raise WeightsError(f"{spec.name}: HF {architecture} has one RoPE for every layer")
    if spec.rope_llama3:
        factor, low, high, original = spec.rope_llama3
        config["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                                  "high_freq_factor": high, "original_max_position_embeddings": original}
    if spec.rope_longrope and spec.family != "phi3":
        raise WeightsError(f"{spec.name}: llmdiff writes LongRoPE for HF Phi3ForCausalLM only")
    if spec.family == "phi3":
        # As Phi-3's config.json: the original context at the top level (Phi3Config reads it
        # there first), the context extension from max_position_embeddings, LongRoPE as
        # `"type": "longrope"` (the 128k repos' older configs say "su").
        original = spec.rope_longrope[2] if spec.rope_longrope else spec.max_positions
        config["original_max_position_embeddings"] = original
        config["rope_scaling"] = ({"type": "longrope", "short_factor": list(spec.rope_longrope[0]),
                                   "long_factor": list(spec.rope_longrope[1])} if spec.rope_longrope else None)
        config.pop("head_dim")  # Phi3Config derives it: hidden / heads
        if spec.head_dim * spec.num_heads != spec.hidden_size:
            raise WeightsError(f"{spec.name}: HF Phi-3 needs head_dim = hidden / heads")
        if not spec.hf_fused_projections or spec.qkv_bias or spec.qk_norm:
            raise WeightsError(f"{spec.name}: HF Phi-3 fuses qkv and gate_up, without biases or q/k norms")
    if set(spec.layer_types) == {"local"}:
        config["sliding_window"] = spec.sliding_window
    elif "local" in spec.layer_types:
        raise WeightsError(f"{spec.name}: HF {architecture} slides on every layer or none")
    elif spec.family in ("mistral", "qwen2", "qwen3", "phi3"):
        config["sliding_window"] = None
    if spec.family in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
        if spec.disabled_sliding_window:   # Qwen 2.5: a window carried, switched off
            config["sliding_window"] = spec.disabled_sliding_window
    if spec.family == "qwen2":
        config.pop("head_dim")  # Qwen2 derives it: hidden / heads
        if spec.head_dim * spec.num_heads != spec.hidden_size:
            raise WeightsError(f"{spec.name}: HF Qwen2 needs head_dim = hidden / heads")
    return config


def spec_period(spec: ModelSpec) -> int:
    """Gemma 3's `sliding_window_pattern`: the pattern's length, whose last layer is global."""
    from llmdiff.spec import pattern_period

    period = pattern_period(spec.layer_types)
    types = spec.layer_types[:period]
    if types != ("local",) * (period - 1) + ("global",) and period > 1:
        raise WeightsError(f"{spec.name}: HF Gemma 3 before 4.53 needs (local,)*n + (global,) layers")
    return period


def write_hf_checkpoint(path, spec: ModelSpec, canon: dict, dtype: str = "bfloat16", files=None) -> Path:
    """model.safetensors and the JSON `files` ({name: content}; default: config.json from the
    spec), as `save_pretrained` would write them."""
    import ml_dtypes

    path = write_hf_config(path, spec, dtype, files)
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]
    tensors = {k: np.asarray(v).astype(np_dtype) for k, v in convert.to_hf(spec, canon).items()}
    safetensors_file.save(path / "model.safetensors", tensors, {"format": "pt"})
    return path


def write_hf_config(path, spec: ModelSpec, dtype: str = "bfloat16", files=None) -> Path:
    """A checkpoint directory with its JSON `files` alone (default: config.json from the spec):
    the HF worker makes its own weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, content in (files or {"config.json": hf_config(spec, dtype)}).items():
        (path / name).write_text(json.dumps(content, indent=2) + "\n")
    return path


def read_hf_checkpoint(path, spec: ModelSpec) -> dict[str, np.ndarray]:
    """The canonical set (float32) of a local HF checkpoint directory: the files transformers
    reads with `use_safetensors=True` (`checkpoint_files.weight_files`), never a pickle, never
    a stray safetensors file, never a checkpoint that needs its own code to load. The whole set
    in memory at once: `HFCheckpoint` gives the same tensors one at a time."""
    from llmdiff import checkpoint_files

    path = _checked_checkpoint_dir(path, spec)
    chosen = checkpoint_files.weight_files(path)
    tensors = {}
    for name in chosen.files:
        for tname, value in safetensors_file.load(path / name).items():
            if tname in tensors:
                raise WeightsError(f"{path}: tensor {tname!r} is in two weight files ({name} and another)")
            tensors[tname] = value
    canon = convert.from_hf(spec, tensors, where=str(path))
    return {k: np.asarray(v, dtype=np.float32) for k, v in canon.items()}


def _checked_checkpoint_dir(path, spec: ModelSpec) -> Path:
    """`path` as a Path: an existing directory whose config.json, if any, is `spec`'s model."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights path {path} does not exist")
    if not path.is_dir():
        raise WeightsError(f"weights path {path} is not a directory (expected an HF checkpoint dir)")
    config_path = path / "config.json"
    config = checked_config(path, spec)
    if config is not None:
        for key, want in hf_format.spec_sizes(spec).items():   # checked when present
            if key in config and config[key] != want:
                raise WeightsError(f"{config_path}: {key}={config[key]!r} but {spec.name} has {want};"
                                   f" to compare the checkpoint as it is: llmdiff compare {path}")
    return path


BLOCK_BYTES = 16 << 20   # float32 bytes per block of `HFCheckpoint.blocks`
READ_AHEAD = 2           # blocks converting or converted ahead of the caller, per conversion thread
MAX_THREADS = 16         # conversion threads at most (`_pool`)


_TILE = 128   # a transposed view is converted in TILE x TILE squares, which stay in cache


def _threads() -> int:
    """Conversion threads: the cores this process may run on, at most MAX_THREADS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cores))


@functools.lru_cache(maxsize=1)
def _pool():
    """The process's conversion threads: every step of a conversion is a numpy loop that releases
    the GIL (`_convert_into`), so they run on as many cores."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="llmdiff-weights")


def _is_bfloat16(dtype) -> bool:
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16"


def _convert_into(out: np.ndarray, v: np.ndarray) -> None:
    """`out[...] = v` for a C-contiguous float32 `out` of `v`'s shape: the values of
    `np.ascontiguousarray(v, np.float32)`, bit for bit. A bfloat16 value is the high half of its
    float32 one, so bfloat16 is copied as uint16 into uint32 and shifted left by 16 (numpy's own
    integer loops, which release the GIL; ml_dtypes' cast holds it, and is 2x slower on a
    transposed view). A transposed view (its last axis strided in memory, as most canonical
    tensors are of their HF ones) is copied square by square, each read and written within the
    cache, instead of one strided sweep of the whole (measured 3-4x faster)."""
    if _is_bfloat16(v.dtype):
        bits = out.view(np.uint32)
        _copy(bits, v.view(np.uint16))
        np.left_shift(bits, 16, out=bits)
    else:
        _copy(out, v)


def _copy(out: np.ndarray, v: np.ndarray) -> None:
    if v.ndim < 2 or v.size < _TILE * _TILE or abs(v.strides[-1]) <= abs(v.strides[-2]):
        out[...] = v
        return
    for i in range(0, v.shape[-2], _TILE):
        for j in range(0, v.shape[-1], _TILE):
            out[..., i:i + _TILE, j:j + _TILE] = v[..., i:i + _TILE, j:j + _TILE]


_ALIGN = 64   # bytes: XLA:CPU makes a device array of a numpy one so aligned without copying it


def _aligned_empty(shape) -> np.ndarray:
    """np.empty(shape, np.float32) starting on an _ALIGN-byte boundary (numpy's own is 16): a CPU
    worker's `jax.device_put` of it then aliases it (measured, jax 0.10) instead of holding the
    tensor twice while the copy is made."""
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(count * 4 + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + count * 4].view(np.float32).reshape(shape)


_PIECE_BYTES = 4 << 20   # float32 bytes at least per thread's piece of one tensor (`_float32`)


def _float32(v: np.ndarray, parallel: bool = False) -> np.ndarray:
    """`np.ascontiguousarray(v, np.float32)`, the same values (`_convert_into`); `parallel`: its
    rows split over the conversion threads (`_pool`). The view itself where it is float32 and
    contiguous already (the file's own bytes, read-only)."""
    if v.dtype == np.float32 and v.flags.c_contiguous:
        return v
    out = _aligned_empty(v.shape)
    rows = v.shape[0] if v.ndim else 0
    pieces = min(_threads(), rows, out.nbytes // _PIECE_BYTES) if parallel else 1
    if pieces <= 1:
        _convert_into(out, v)
        return out
    bounds = [rows * k // pieces for k in range(pieces + 1)]
    list(_pool().map(lambda k: _convert_into(out[bounds[k]:bounds[k + 1]], v[bounds[k]:bounds[k + 1]]),
                     range(pieces)))
    return out


def _group(name: str):
    """Canonical tensors converted together: a layer's (its HF tensors are read by one
    `convert.from_hf_layer`), or one top-level tensor alone."""
    layer = re.match(r"L(\d+)\.", name)
    return int(layer.group(1)) if layer else name


class HFCheckpoint:
    """A local HF checkpoint directory's canonical tensors (float32), converted one at a time
    from its weight files: the values of `read_hf_checkpoint`, bit for bit, without the whole
    set in memory. Opening checks what `read_hf_checkpoint` checks (the directory, config.json,
    which files are weights, every safetensors header, each tensor's name and shape) before any
    value is read. The files are memory-mapped; the pages of the HF tensors a read converted are
    handed back to the page cache after it (`madvise(MADV_DONTNEED)`), so a process holds about
    the tensors it asked for, whatever the checkpoint's size."""

    def __init__(self, path, spec: ModelSpec):
        from llmdiff import checkpoint_files

        self.path, self.spec = _checked_checkpoint_dir(path, spec), spec
        self._files, self._where = {}, {}     # file -> (header, start, mapping); HF name -> file
        for fname in checkpoint_files.weight_files(self.path).files:
            header, start, mapping = safetensors_file.mapped(self.path / fname)
            self._files[fname] = (header, start, mapping)
            for tname in header:
                if tname in self._where:
                    raise WeightsError(f"{self.path}: tensor {tname!r} is in two weight files"
                                       f" ({self._where[tname]} and {fname})")
                self._where[tname] = fname
        lm_head = "lm_head.weight" in self._where
        shapes = {n: _Shape(self._files[f][0][n]["shape"]) for n, f in self._where.items()}
        convert.check_tensors(shapes, convert.hf_shapes(spec, lm_head=lm_head), str(self.path), spec)
        self.names = sorted(convert.canonical_shapes(spec, lm_head=lm_head))   # the fingerprint's order

    def _hf(self, name: str, touched: list) -> np.ndarray:
        fname = self._where[name]
        header, start, mapping = self._files[fname]
        touched.append((mapping, start, header[name]["data_offsets"]))
        return safetensors_file.view(self.path / fname, header, start, mapping, name)

    def _views(self, group, touched: list, put=None) -> dict:
        """The canonical tensors of `group` (`_group`) as views of the mapped HF ones; with
        `put`, of `put(hf_tensor)` of each HF tensor as stored (another array library's)."""
        hf = _HFTensors(self, touched, put)
        if isinstance(group, int) and 0 <= group < self.spec.num_layers:
            return convert.from_hf_layer(self.spec, group, hf)
        return convert.from_hf_top(self.spec, hf, only=group)   # a top-level tensor is a group alone

    def _missing(self, name: str) -> WeightsError:
        return WeightsError(f"{self.path}: no canonical tensor {name!r} for {self.spec.name}")

    def read(self, names, put=None) -> dict:
        """{name: float32 array} for canonical `names`, each contiguous (read-only where it is
        the file's own float32 bytes), converted on the conversion threads (`_pool`).

        `put` (an array library's `asarray`): the same values, made by that library. Each HF
        tensor a group needs is handed to `put` once, as stored (its own dtype, a view of the
        file's bytes), and the canonical views (`convert.from_hf_layer`: transposes, reshapes,
        row slices) and the cast to float32 are the library's: with `jax.numpy.asarray`, a
        GPU's. The host converts nothing and moves half the bytes of a 16-bit checkpoint.
        Transposes and reshapes are exact, and so is widening bfloat16 or float16 to float32
        (subnormals kept: tested), so the values are the host's, bit for bit."""
        groups: dict = {}
        for name in names:
            groups.setdefault(_group(name), []).append(name)
        out = {}
        for group, members in groups.items():
            touched: list = []
            try:
                views = self._views(group, touched)
                if len(members) == len(views):   # the whole group: its bytes read ahead of the conversion
                    _advise(touched, "MADV_WILLNEED")
                    if isinstance(group, int) and group + 1 < self.spec.num_layers:
                        ahead: list = []   # and the next layer's, which a worker loading layer by layer asks for next
                        self._views(group + 1, ahead)
                        _advise(ahead, "MADV_WILLNEED")
                if put is not None:
                    views = self._views(group, [], put)
                for name in members:
                    if name not in views:
                        raise self._missing(name)
                    v = views[name]
                    if put is None:
                        out[name] = _float32(v, parallel=True)
                    else:
                        out[name] = v if v.dtype == np.float32 else v.astype(np.float32)
            finally:
                _release(touched)
        return out

    def blocks(self, block_bytes: int = BLOCK_BYTES):
        """(name, block, non-finite count, digest) for every canonical tensor, in `names`' order:
        float32 blocks of whole rows of about `block_bytes` (`_row_blocks`), which laid end to end
        are the tensor's bytes, how many of the block's values are NaN or Inf, and the block's
        sha256 (`_digest`, the fingerprint's leaf). A thread walks the groups (each group's bytes read ahead, `MADV_WILLNEED`) and hands
        each block to the conversion threads (`_pool`), READ_AHEAD per thread ahead of the caller,
        which gets them in order; a group's HF pages are released once the caller has all its
        blocks, so memory holds about the largest HF tensor plus a few blocks per thread."""
        import queue
        import threading

        ready: queue.Queue = queue.Queue(maxsize=READ_AHEAD * _threads())
        stop = threading.Event()
        thread = threading.Thread(target=self._submit_blocks, args=(block_bytes, ready, stop),
                                  name="llmdiff-weights-walk", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, list):   # the pages of a group whose blocks all came before
                    _release(item)
                    continue
                yield item.result()
        finally:
            stop.set()
            while thread.is_alive() or not ready.empty():   # a walker blocked on a full queue sees `stop`
                try:
                    item = ready.get(timeout=0.1)
                except queue.Empty:
                    continue
                if isinstance(item, list):
                    _release(item)

    def _submit_blocks(self, block_bytes: int, ready, stop) -> None:
        from itertools import groupby

        pool = _pool()
        groups = [(group, list(members)) for group, members in groupby(self.names, key=_group)]
        try:
            for k, (group, members) in enumerate(groups):
                touched: list = []
                try:
                    views = self._views(group, touched)
                    _advise(touched, "MADV_WILLNEED")   # the group's bytes read ahead of the conversion
                    if k + 1 < len(groups):   # and the next group's, so that a cold disk reads on meanwhile
                        ahead: list = []
                        self._views(groups[k + 1][0], ahead)
                        _advise(ahead, "MADV_WILLNEED")
                    for name in members:
                        if name not in views:
                            raise self._missing(name)
                        for block in _row_blocks(views[name], block_bytes):
                            if stop.is_set():
                                return
                            ready.put(pool.submit(_counted_block, name, block))
                finally:
                    ready.put(touched)   # released by the caller once it has the group's blocks
            ready.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
            ready.put(e)


def _row_blocks(v: np.ndarray, block_bytes: int):
    """`v` in blocks of whole rows of about `block_bytes` as float32 (one row a block where a
    row is larger; a tensor of no rows, or of no axes, is one block)."""
    rows = v.shape[0] if v.ndim else 0
    if not rows:
        yield v
        return
    per = max(1, block_bytes // max(1, 4 * (v.size // rows)))
    for r0 in range(0, rows, per):
        yield v[r0:r0 + per]


def _counted_block(name: str, v: np.ndarray):
    block = _float32(v)
    return name, block, _non_finite(block), _digest(block)


def _digest(block: np.ndarray) -> bytes:
    """sha256 of a block's float32 bytes: on the thread that has it (hashlib lets go of the GIL)."""
    return hashlib.sha256(np.ascontiguousarray(block, np.float32).reshape(-1).view(np.uint8)).digest()


class _Shape:
    """A tensor's shape alone, for `convert.check_tensors`."""

    def __init__(self, shape):
        self.shape = tuple(shape)


class _HFTensors:
    """The HF tensors of an `HFCheckpoint` by name, mapped when asked for; `touched` hears each."""

    def __init__(self, checkpoint: HFCheckpoint, touched: list, put=None):
        self.checkpoint, self.touched, self.put, self.made = checkpoint, touched, put, {}

    def __contains__(self, name) -> bool:
        return name in self.checkpoint._where

    def __getitem__(self, name) -> np.ndarray:
        if self.put is None:
            return self.checkpoint._hf(name, self.touched)
        if name not in self.made:   # once, however many canonical tensors it gives (Phi-3's fused ones)
            self.made[name] = self.put(self.checkpoint._hf(name, self.touched))
        return self.made[name]


def _advise(touched: list, advice: str) -> None:
    """madvise the mapped bytes of the HF tensors in `touched`: "MADV_WILLNEED" starts reading
    them from the disk ahead of their use; "MADV_DONTNEED" hands their pages back to the page
    cache, out of this process's resident memory (a later access reads them again, from the
    cache or the disk). Nothing where the platform lacks it."""
    import mmap

    flag = getattr(mmap, advice, None)
    if flag is None:
        return
    for mapping, start, (lo, hi) in touched:
        if mapping is None or hi == lo:
            continue
        first = (start + lo) // mmap.PAGESIZE * mmap.PAGESIZE
        last = min(len(mapping), start + hi)
        mapping.madvise(flag, first, last - first)


def _release(touched: list) -> None:
    _advise(touched, "MADV_DONTNEED")


@functools.lru_cache(maxsize=2)
def _open_checkpoint(path: str, spec: ModelSpec) -> HFCheckpoint:
    return HFCheckpoint(path, spec)


def canonical_tensors(spec: ModelSpec, source, names=None, put=None) -> dict:
    """The canonical tensors (float32) a worker asks for by `names` (None: every one), from
    where the run's `source` (`job.WeightsSource`) keeps them: llmdiff's canonical safetensors
    file, or converted one at a time from an HF checkpoint directory's own weight files
    (`source.from_hf`: `HFCheckpoint`, opened once per process). `put` (an array library's
    `asarray`): the tensors are that library's (`HFCheckpoint.read`).
    Weights made from a seed are the worker's to make (`generate_*`)."""
    if source.from_hf:
        checkpoint = _open_checkpoint(str(source.hf_dir), spec)
        names = checkpoint.names if names is None else names
        return checkpoint.read(names, put)
    if source.canonical:
        loaded = safetensors_file.load(source.canonical, names).items()
        return {n: np.asarray(a, np.float32) if put is None else put(a).astype(np.float32) for n, a in loaded}
    raise WeightsError("these weights are made from a seed on the worker's device: no file holds them")


def checked_config(path, spec: ModelSpec) -> dict | None:
    """The checkpoint's config.json (None without one), refused when its `model_type` is not
    the spec's family: transformers would need the checkpoint's own code for it (`auto_map`),
    which llmdiff never runs, or it is another model."""
    from llmdiff import checkpoint_files

    config_path = Path(path) / "config.json"
    if not os.path.lexists(config_path):
        return None
    config = checkpoint_files.read_json(config_path, what="config")
    model_type = config.get("model_type")
    wanted = hf_format.MODEL_TYPES.get(spec.family, ())
    if model_type not in wanted:
        code = checkpoint_files.remote_code(path, config)
        why = (f"; it needs the checkpoint's own code ({', '.join(code)}), which llmdiff never runs"
               if code else "")
        raise WeightsError(f"{config_path}: model_type {model_type!r}, but {spec.name} is"
                           f" {' or '.join(map(repr, wanted))}{why}")
    return config


def checkpoint_notes(path) -> dict:
    """What in a checkpoint directory llmdiff did not read, for the report: stray safetensors
    files, pickles, code."""
    from llmdiff import checkpoint_files

    chosen = checkpoint_files.weight_files(path)
    return {k: v for k, v in (("files", chosen.files), ("ignored_safetensors", chosen.stray),
                              ("ignored_pickles", chosen.pickles), ("ignored_code", chosen.code)) if v}


def refuse_non_finite(canon: dict, where) -> None:
    """NaN or Inf in the weights is the checkpoint's defect, not an implementation's: say so
    before any model runs instead of reporting a divergence."""
    for name in sorted(canon):
        if bad := _non_finite(canon[name]):
            raise _non_finite_error(name, bad, where)


def _non_finite_error(name: str, bad: int, where) -> WeightsError:
    return WeightsError(f"{where or 'the weights'}: tensor {name} holds {bad} NaN/Inf values;"
                        f" every implementation would compute garbage (`llmdiff audit` lists them: LD701)")


_FINITE_PIECE = 1 << 20   # elements: the check's temporary stays small, whatever the tensor


def _non_finite(a) -> int:
    """How many values of `a` are NaN or Inf."""
    flat = np.asarray(a).reshape(-1)
    scratch = np.empty(min(_FINITE_PIECE, flat.size), bool)
    bad = 0
    for i in range(0, flat.size, _FINITE_PIECE):
        piece = flat[i:i + _FINITE_PIECE]
        finite = np.isfinite(piece, out=scratch[:piece.size])
        if not finite.all():
            bad += piece.size - int(np.count_nonzero(finite))
    return bad


def save_canonical(path, canon: dict) -> None:
    safetensors_file.save(path, {k: np.asarray(v, np.float32) for k, v in canon.items()})


FINGERPRINT = "v2-"   # the fingerprint's scheme; one without a prefix (reports before 2026-12) hashed one stream


def weights_fingerprint(canon: dict, block_bytes: int = BLOCK_BYTES) -> str:
    """FINGERPRINT and 16 hex digits of a tree of sha256: each tensor's float32 bytes in blocks
    of whole rows (`_row_blocks`; BLOCK_BYTES is part of the definition) hashed on every core,
    then one sha256 over each sorted name with its blocks' digests. Identical weights give
    identical fingerprints, whatever they were read from. (The one sha256 over every byte that
    reports had before took 33 s for a gemma-7b checkpoint, 34 GB as float32, on one core of the
    H200's host: longer than the compare's workers.) `block_bytes`: tests make blocks small."""
    names = sorted(canon)
    blocks = [(name, b) for name in names for b in _row_blocks(np.asarray(canon[name]), block_bytes)]
    digests = list(_pool().map(lambda item: (item[0], _digest(item[1])), blocks))
    return _tree(digests)


def _tree(digests) -> str:
    """The fingerprint of (name, block digest) pairs: each tensor's in order, names sorted."""
    h = hashlib.sha256(FINGERPRINT.encode())
    current = None
    for name, digest in digests:
        if name != current:
            h.update(b"\0" + name.encode() + b"\0")
            current = name
        h.update(digest)
    return FINGERPRINT + h.hexdigest()[:16]


def checked_fingerprint(blocks, where) -> str:
    """`refuse_non_finite` then `weights_fingerprint`, in one pass over (name, float32 block,
    its NaN/Inf count, its digest) of each tensor's blocks in order, the tensors in sorted name
    order (`HFCheckpoint.blocks`, whose blocks the fingerprint's are). The same error naming the
    same tensor and count, the same fingerprint, without the whole set in memory."""
    digests, current, bad = [], None, 0
    for name, _block, non_finite, digest in blocks:
        if name != current:
            if bad:
                raise _non_finite_error(current, bad, where)
            if current is not None and name < current:
                raise ValueError(f"checked_fingerprint: {name!r} after {current!r}; the fingerprint's order is sorted")
            current = name
        bad += non_finite
        digests.append((name, digest))
    if bad:
        raise _non_finite_error(current, bad, where)
    return _tree(digests)


def generated_fingerprint(spec: ModelSpec, seed: int) -> str:
    """`weights_fingerprint` of `random_weights(spec, seed)` without making them: the generator
    is a function of (seed, name, index), so the name, shape and seed of each tensor fix it."""
    h = hashlib.sha256(b"llmdiff-hash-uniform-1")
    for name, shape in sorted(convert.canonical_shapes(spec).items()):
        h.update(f"{seed}:{name}:{shape}:{tensor_std(spec, name)!r}".encode())
    return h.hexdigest()[:16]


def is_safetensors(path) -> bool:
    return os.fspath(path).endswith(".safetensors")
