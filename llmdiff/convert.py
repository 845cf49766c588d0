"""Converters between the canonical weight set and each implementation's native layout.

Canonical layout (numpy, one entry per tensor, shapes in spec letters):
    embed                 (V, D)
    L{i}.attn_norm        (D,)       norm scales are stored without the +1, as on both sides
    L{i}.q                (N, D, H)
    L{i}.k, L{i}.v        (K, D, H)
    L{i}.o                (N, H, D)
    L{i}.mlp_norm         (D,)
    L{i}.gate, L{i}.up    (D, F)     gate is the GELU branch
    L{i}.down             (F, D)
    final_norm            (D,)
    lm_head               (V, D)     only in checkpoints that do not tie it to embed

Every conversion asserts the key set and each shape and names the tensor that failed. They
only transpose, reshape, stack and index, so a round trip is bit-exact. numpy only.
"""

from __future__ import annotations

import numpy as np

from llmdiff.errors import WeightsError
from llmdiff.spec import ModelSpec


def canonical_shapes(spec: ModelSpec, *, lm_head: bool = False) -> dict[str, tuple[int, ...]]:
    V, D, N, K, H, F = (spec.vocab_size, spec.hidden_size, spec.num_heads, spec.num_kv_heads,
                        spec.head_dim, spec.mlp_dim)
    shapes = {"embed": (V, D), "final_norm": (D,)}
    for i in range(spec.num_layers):
        shapes.update({
            f"L{i}.attn_norm": (D,), f"L{i}.q": (N, D, H), f"L{i}.k": (K, D, H),
            f"L{i}.v": (K, D, H), f"L{i}.o": (N, H, D), f"L{i}.mlp_norm": (D,),
            f"L{i}.gate": (D, F), f"L{i}.up": (D, F), f"L{i}.down": (F, D),
        })
    if lm_head:
        shapes["lm_head"] = (V, D)
    return shapes


def check_tensors(tensors: dict, shapes: dict, where: str, spec: ModelSpec) -> None:
    """Raise a one-line WeightsError unless `tensors` has exactly `shapes`."""
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{where}: missing tensor {missing[0]!r}{more} expected by {spec.name}")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise WeightsError(f"{where}: unexpected tensor {extra[0]!r}{more} for {spec.name}")
    for name, shape in shapes.items():
        got = tuple(tensors[name].shape)
        if got != tuple(shape):
            raise WeightsError(
                f"{where}: shape mismatch: {name} has shape {got} but {spec.name} expects {tuple(shape)}")


# --- Hugging Face transformers (GemmaForCausalLM) -------------------------------------------

def _hf_layer(i: int) -> str:
    return f"model.layers.{i}"


def to_hf(spec: ModelSpec, canon: dict) -> dict[str, np.ndarray]:
    check_tensors(canon, canonical_shapes(spec, lm_head="lm_head" in canon), "canonical weights", spec)
    D = spec.hidden_size
    out = {"model.embed_tokens.weight": canon["embed"], "model.norm.weight": canon["final_norm"]}
    if "lm_head" in canon:
        out["lm_head.weight"] = canon["lm_head"]
    for i in range(spec.num_layers):
        p, c = _hf_layer(i), f"L{i}."
        out[f"{p}.input_layernorm.weight"] = canon[c + "attn_norm"]
        # (N, D, H) -> (N, H, D) -> (N*H, D): torch Linear stores (out, in)
        for name in ("q", "k", "v"):
            w = canon[c + name]
            out[f"{p}.self_attn.{name}_proj.weight"] = w.transpose(0, 2, 1).reshape(-1, D)
        out[f"{p}.self_attn.o_proj.weight"] = canon[c + "o"].reshape(-1, D).T  # (D, N*H)
        # Gemma 1 calls the norm before the MLP `post_attention_layernorm` (a naming trap).
        out[f"{p}.post_attention_layernorm.weight"] = canon[c + "mlp_norm"]
        out[f"{p}.mlp.gate_proj.weight"] = canon[c + "gate"].T  # (F, D)
        out[f"{p}.mlp.up_proj.weight"] = canon[c + "up"].T
        out[f"{p}.mlp.down_proj.weight"] = canon[c + "down"].T  # (D, F)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def hf_shapes(spec: ModelSpec, *, lm_head: bool = False) -> dict[str, tuple[int, ...]]:
    V, D, N, K, H, F = (spec.vocab_size, spec.hidden_size, spec.num_heads, spec.num_kv_heads,
                        spec.head_dim, spec.mlp_dim)
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if lm_head:
        shapes["lm_head.weight"] = (V, D)
    for i in range(spec.num_layers):
        p = _hf_layer(i)
        shapes.update({
            f"{p}.input_layernorm.weight": (D,), f"{p}.self_attn.q_proj.weight": (N * H, D),
            f"{p}.self_attn.k_proj.weight": (K * H, D), f"{p}.self_attn.v_proj.weight": (K * H, D),
            f"{p}.self_attn.o_proj.weight": (D, N * H), f"{p}.post_attention_layernorm.weight": (D,),
            f"{p}.mlp.gate_proj.weight": (F, D), f"{p}.mlp.up_proj.weight": (F, D),
            f"{p}.mlp.down_proj.weight": (D, F),
        })
    return shapes


def from_hf(spec: ModelSpec, hf: dict, where: str = "HF checkpoint") -> dict[str, np.ndarray]:
    check_tensors(hf, hf_shapes(spec, lm_head="lm_head.weight" in hf), where, spec)
    N, K, H, D = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size
    out = {"embed": hf["model.embed_tokens.weight"], "final_norm": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        out["lm_head"] = hf["lm_head.weight"]
    for i in range(spec.num_layers):
        p, c = _hf_layer(i), f"L{i}."
        out[c + "attn_norm"] = hf[f"{p}.input_layernorm.weight"]
        for name, heads in (("q", N), ("k", K), ("v", K)):
            w = hf[f"{p}.self_attn.{name}_proj.weight"]
            out[c + name] = w.reshape(heads, H, D).transpose(0, 2, 1)
        out[c + "o"] = hf[f"{p}.self_attn.o_proj.weight"].T.reshape(N, H, D)
        out[c + "mlp_norm"] = hf[f"{p}.post_attention_layernorm.weight"]
        out[c + "gate"] = hf[f"{p}.mlp.gate_proj.weight"].T
        out[c + "up"] = hf[f"{p}.mlp.up_proj.weight"].T
        out[c + "down"] = hf[f"{p}.mlp.down_proj.weight"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# --- Google DeepMind's gemma (flattened Flax params, '/'-joined) --------------------------

def to_deepmind(spec: ModelSpec, canon: dict) -> dict[str, np.ndarray]:
    check_tensors(canon, canonical_shapes(spec), "canonical weights", spec)
    out = {"embedder/input_embedding": canon["embed"], "final_norm/scale": canon["final_norm"]}
    for i in range(spec.num_layers):
        p, c = f"layer_{i}", f"L{i}."
        out[f"{p}/pre_attention_norm/scale"] = canon[c + "attn_norm"]
        if spec.num_heads == spec.num_kv_heads:  # DeepMind fuses q, k, v when K == N
            out[f"{p}/attn/qkv_einsum/w"] = np.stack([canon[c + "q"], canon[c + "k"], canon[c + "v"]])
        else:
            out[f"{p}/attn/q_einsum/w"] = canon[c + "q"]  # (N, D, H)
            out[f"{p}/attn/kv_einsum/w"] = np.stack([canon[c + "k"], canon[c + "v"]])  # (2, K, D, H)
        out[f"{p}/attn/attn_vec_einsum/w"] = canon[c + "o"]  # (N, H, D)
        out[f"{p}/pre_ffw_norm/scale"] = canon[c + "mlp_norm"]
        out[f"{p}/mlp/gating_einsum"] = np.stack([canon[c + "gate"], canon[c + "up"]])  # (2, D, F)
        out[f"{p}/mlp/linear"] = canon[c + "down"]  # (F, D)
    return out


def deepmind_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    V, D, N, K, H, F = (spec.vocab_size, spec.hidden_size, spec.num_heads, spec.num_kv_heads,
                        spec.head_dim, spec.mlp_dim)
    shapes = {"embedder/input_embedding": (V, D), "final_norm/scale": (D,)}
    for i in range(spec.num_layers):
        p = f"layer_{i}"
        if N == K:
            shapes[f"{p}/attn/qkv_einsum/w"] = (3, N, D, H)
        else:
            shapes[f"{p}/attn/q_einsum/w"] = (N, D, H)
            shapes[f"{p}/attn/kv_einsum/w"] = (2, K, D, H)
        shapes.update({
            f"{p}/pre_attention_norm/scale": (D,), f"{p}/attn/attn_vec_einsum/w": (N, H, D),
            f"{p}/pre_ffw_norm/scale": (D,), f"{p}/mlp/gating_einsum": (2, D, F),
            f"{p}/mlp/linear": (F, D),
        })
    return shapes


def from_deepmind(spec: ModelSpec, dm: dict, where: str = "DeepMind checkpoint") -> dict[str, np.ndarray]:
    check_tensors(dm, deepmind_shapes(spec), where, spec)
    out = {"embed": dm["embedder/input_embedding"], "final_norm": dm["final_norm/scale"]}
    for i in range(spec.num_layers):
        p, c = f"layer_{i}", f"L{i}."
        out[c + "attn_norm"] = dm[f"{p}/pre_attention_norm/scale"]
        if spec.num_heads == spec.num_kv_heads:
            out[c + "q"], out[c + "k"], out[c + "v"] = dm[f"{p}/attn/qkv_einsum/w"]
        else:
            out[c + "q"] = dm[f"{p}/attn/q_einsum/w"]
            out[c + "k"], out[c + "v"] = dm[f"{p}/attn/kv_einsum/w"]
        out[c + "o"] = dm[f"{p}/attn/attn_vec_einsum/w"]
        out[c + "mlp_norm"] = dm[f"{p}/pre_ffw_norm/scale"]
        out[c + "gate"], out[c + "up"] = dm[f"{p}/mlp/gating_einsum"]
        out[c + "down"] = dm[f"{p}/mlp/linear"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """'a/b/c' keys -> nested dicts, the tree Flax's `apply` takes."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
