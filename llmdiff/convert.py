"""Converters between the canonical weight set and each implementation's native layout.

Canonical layout (numpy, one entry per tensor, shapes in spec letters):
    embed                 (V, D)     V = DeepMind's rows (`spec.vocab_size`)
    L{i}.attn_norm        (D,)       norm scales are stored without the +1, as on both sides
    L{i}.q                (N, D, H)
    L{i}.k, L{i}.v        (K, D, H)
    L{i}.q_norm, k_norm   (H,)       Gemma 3, Qwen3: RMSNorm of each head of q and k, before RoPE
    L{i}.q_bias           (N, H)     Qwen2: the projections' biases
    L{i}.k_bias, v_bias   (K, H)
    L{i}.o                (N, H, D)
    L{i}.post_attn_norm   (D,)       Gemma 2/3: on the attention output, before the residual add
    L{i}.mlp_norm         (D,)
    L{i}.gate, L{i}.up    (D, F)     gate is the GELU branch
    L{i}.down             (F, D)
    L{i}.post_mlp_norm    (D,)       Gemma 2/3: on the MLP output, before the residual add
    final_norm            (D,)
    lm_head               (V, D)     models and checkpoints that do not tie it to embed

Every conversion asserts the key set and each shape and names the tensor that failed. They
only transpose, reshape, stack, concatenate and index, so a round trip is bit-exact. numpy only.

Phi-3's HF checkpoints fuse projections (`spec.hf_fused_projections`): `qkv_proj` holds the q,
k and v rows in that order, `gate_up_proj` the gate rows then the up rows; the canonical set
keeps them apart, as every other family.

Embedding rows: where HF's table and DeepMind's differ in size (`spec.hf_vocab_size`), the
rows no text token reaches are dropped going to the smaller table and come back as zeros, so a
round trip is bit-exact when those rows are zero (as `weights.random_weights` makes them).
"""

from __future__ import annotations

import numpy as np

from llmdiff.errors import WeightsError
from llmdiff.spec import ModelSpec


def canonical_shapes(spec: ModelSpec, *, lm_head: bool = False) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor's shape; `lm_head` also where the spec ties it (an untied
    checkpoint of a tied model)."""
    V, D, N, K, H, F = (spec.vocab_size, spec.hidden_size, spec.num_heads, spec.num_kv_heads,
                        spec.head_dim, spec.mlp_dim)
    shapes = {"embed": (V, D), "final_norm": (D,)}
    for i in range(spec.num_layers):
        shapes.update({
            f"L{i}.attn_norm": (D,), f"L{i}.q": (N, D, H), f"L{i}.k": (K, D, H),
            f"L{i}.v": (K, D, H), f"L{i}.o": (N, H, D), f"L{i}.mlp_norm": (D,),
            f"L{i}.gate": (D, F), f"L{i}.up": (D, F), f"L{i}.down": (F, D),
        })
        if spec.qk_norm:
            shapes.update({f"L{i}.q_norm": (H,), f"L{i}.k_norm": (H,)})
        if spec.qkv_bias:
            shapes.update({f"L{i}.q_bias": (N, H), f"L{i}.k_bias": (K, H), f"L{i}.v_bias": (K, H)})
        if spec.post_attn_norm:
            shapes[f"L{i}.post_attn_norm"] = (D,)
        if spec.post_mlp_norm:
            shapes[f"L{i}.post_mlp_norm"] = (D,)
    if lm_head or not spec.tie_embeddings:
        shapes["lm_head"] = (V, D)
    return shapes


def resize_rows(table: np.ndarray, rows: int) -> np.ndarray:
    """The first `rows` rows of `table`, or `table` followed by zero rows up to `rows` (numpy,
    a torch tensor on its device, or a JAX array on its)."""
    if table.shape[0] >= rows:
        return table[:rows]
    if hasattr(table, "new_zeros"):  # torch
        return _rows([table, table.new_zeros((rows - table.shape[0], *table.shape[1:]))])
    if not isinstance(table, np.ndarray):  # jax
        import jax.numpy as jnp

        return jnp.concatenate([table, jnp.zeros((rows - table.shape[0], *table.shape[1:]), table.dtype)])
    pad = np.zeros((rows - table.shape[0], *table.shape[1:]), table.dtype)
    return np.concatenate([table, pad])


def _post_norms(spec: ModelSpec) -> bool:
    """Gemma 2/3 layers have four norms; HF then names the pre-MLP one differently."""
    if spec.post_attn_norm != spec.post_mlp_norm:
        raise WeightsError(f"{spec.name}: a post-attention norm without a post-MLP norm (or the"
                           " reverse) has no HF layout")
    return spec.post_attn_norm


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
    D, V_hf = spec.hidden_size, spec.hf_vocab_size or spec.vocab_size
    out = {"model.embed_tokens.weight": resize_rows(canon["embed"], V_hf),
           "model.norm.weight": canon["final_norm"]}
    if "lm_head" in canon:
        out["lm_head.weight"] = resize_rows(canon["lm_head"], V_hf)
    for i in range(spec.num_layers):
        out.update(to_hf_layer(spec, i, canon))
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _rows(parts: list):
    """The row-wise concatenation of numpy arrays or of torch tensors (on their device)."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch

    return torch.cat(parts)


def to_hf_layer(spec: ModelSpec, i: int, canon: dict) -> dict:
    """Layer i's HF tensors from its canonical ones (`canon` needs only those). Only `.mT`,
    `.T`, `.reshape` and row concatenation, so it converts numpy arrays and torch tensors alike."""
    D = spec.hidden_size
    p, c = _hf_layer(i), f"L{i}."
    out = {f"{p}.input_layernorm.weight": canon[c + "attn_norm"]}
    # (N, D, H) -> (N, H, D) -> (N*H, D): torch Linear stores (out, in)
    for name in ("q", "k", "v"):
        out[f"{p}.self_attn.{name}_proj.weight"] = canon[c + name].mT.reshape(-1, D)
        if spec.qkv_bias:  # (heads, H) -> (heads*H,)
            out[f"{p}.self_attn.{name}_proj.bias"] = canon[c + name + "_bias"].reshape(-1)
    if spec.hf_fused_projections:  # Phi-3: one (N*H + 2*K*H, D) projection, q rows first
        out[f"{p}.self_attn.qkv_proj.weight"] = _rows([out.pop(f"{p}.self_attn.{n}_proj.weight") for n in "qkv"])
    out[f"{p}.self_attn.o_proj.weight"] = canon[c + "o"].reshape(-1, D).T  # (D, N*H)
    if spec.qk_norm:
        out[f"{p}.self_attn.q_norm.weight"] = canon[c + "q_norm"]
        out[f"{p}.self_attn.k_norm.weight"] = canon[c + "k_norm"]
    if _post_norms(spec):
        # Gemma 2/3: `post_attention_layernorm` really is after attention; the pre-MLP norm
        # is `pre_feedforward_layernorm`.
        out[f"{p}.post_attention_layernorm.weight"] = canon[c + "post_attn_norm"]
        out[f"{p}.pre_feedforward_layernorm.weight"] = canon[c + "mlp_norm"]
        out[f"{p}.post_feedforward_layernorm.weight"] = canon[c + "post_mlp_norm"]
    else:
        # Gemma 1 calls the norm before the MLP `post_attention_layernorm` (a naming trap).
        out[f"{p}.post_attention_layernorm.weight"] = canon[c + "mlp_norm"]
    if spec.hf_fused_projections:  # Phi-3: one (2F, D) projection, the gate rows first
        out[f"{p}.mlp.gate_up_proj.weight"] = _rows([canon[c + "gate"].T, canon[c + "up"].T])
    else:
        out[f"{p}.mlp.gate_proj.weight"] = canon[c + "gate"].T  # (F, D)
        out[f"{p}.mlp.up_proj.weight"] = canon[c + "up"].T
    out[f"{p}.mlp.down_proj.weight"] = canon[c + "down"].T  # (D, F)
    return out


def layer_names(spec: ModelSpec, i: int) -> list[str]:
    """The canonical names of layer i's tensors."""
    return [n for n in canonical_shapes(spec) if n.startswith(f"L{i}.")]


def hf_shapes(spec: ModelSpec, *, lm_head: bool = False) -> dict[str, tuple[int, ...]]:
    V, D, N, K, H, F = (spec.vocab_size, spec.hidden_size, spec.num_heads, spec.num_kv_heads,
                        spec.head_dim, spec.mlp_dim)
    V = spec.hf_vocab_size or V
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if lm_head or not spec.tie_embeddings:
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
        if spec.qk_norm:
            shapes.update({f"{p}.self_attn.q_norm.weight": (H,), f"{p}.self_attn.k_norm.weight": (H,)})
        if spec.qkv_bias:
            shapes.update({f"{p}.self_attn.q_proj.bias": (N * H,), f"{p}.self_attn.k_proj.bias": (K * H,),
                           f"{p}.self_attn.v_proj.bias": (K * H,)})
        if _post_norms(spec):
            shapes.update({f"{p}.pre_feedforward_layernorm.weight": (D,),
                           f"{p}.post_feedforward_layernorm.weight": (D,)})
        if spec.hf_fused_projections:
            for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
                del shapes[f"{p}.{name}.weight"]
            shapes.update({f"{p}.self_attn.qkv_proj.weight": ((N + 2 * K) * H, D),
                           f"{p}.mlp.gate_up_proj.weight": (2 * F, D)})
    return shapes


def from_hf(spec: ModelSpec, hf: dict, where: str = "HF checkpoint") -> dict[str, np.ndarray]:
    """The canonical set from HF's tensors: numpy arrays, or torch tensors (gradients on the
    device, `references/hf.py`), which come back as views of HF's where a view is enough."""
    check_tensors(hf, hf_shapes(spec, lm_head="lm_head.weight" in hf), where, spec)
    out = from_hf_top(spec, hf)
    for i in range(spec.num_layers):
        out.update(from_hf_layer(spec, i, hf))
    # torch tensors (gradients on the device) stay views of HF's: no second copy of the model
    return {k: np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v for k, v in out.items()}


def from_hf_top(spec: ModelSpec, hf, only: str | None = None) -> dict:
    """The canonical tensors outside the layers (`embed`, `final_norm`, `lm_head` where `hf` has
    one) from the HF ones, as views where they can be (`from_hf` makes them contiguous).
    `only`: that canonical tensor alone, and no other HF tensor asked of `hf`."""
    made = {"embed": lambda: resize_rows(hf["model.embed_tokens.weight"], spec.vocab_size),
            "final_norm": lambda: hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        made["lm_head"] = lambda: resize_rows(hf["lm_head.weight"], spec.vocab_size)
    return {name: make() for name, make in made.items() if only is None or name == only}


def from_hf_layer(spec: ModelSpec, i: int, hf) -> dict:
    """Layer i's canonical tensors from its HF ones (`hf` needs only those): transposes,
    reshapes and row slices, views of `hf`'s arrays (so of memory-mapped ones, nothing is read
    until a value is)."""
    N, K, H, D = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size
    p, c = _hf_layer(i), f"L{i}."
    out = {c + "attn_norm": hf[f"{p}.input_layernorm.weight"]}
    split = _split_fused(spec, hf, p) if spec.hf_fused_projections else hf
    for name, heads in (("q", N), ("k", K), ("v", K)):
        w = split[f"{p}.self_attn.{name}_proj.weight"]
        out[c + name] = w.reshape(heads, H, D).swapaxes(1, 2)   # numpy and torch alike
        if spec.qkv_bias:
            out[c + name + "_bias"] = hf[f"{p}.self_attn.{name}_proj.bias"].reshape(heads, H)
    out[c + "o"] = hf[f"{p}.self_attn.o_proj.weight"].T.reshape(N, H, D)
    if spec.qk_norm:
        out[c + "q_norm"] = hf[f"{p}.self_attn.q_norm.weight"]
        out[c + "k_norm"] = hf[f"{p}.self_attn.k_norm.weight"]
    if _post_norms(spec):
        out[c + "post_attn_norm"] = hf[f"{p}.post_attention_layernorm.weight"]
        out[c + "mlp_norm"] = hf[f"{p}.pre_feedforward_layernorm.weight"]
        out[c + "post_mlp_norm"] = hf[f"{p}.post_feedforward_layernorm.weight"]
    else:
        out[c + "mlp_norm"] = hf[f"{p}.post_attention_layernorm.weight"]
    out[c + "gate"] = split[f"{p}.mlp.gate_proj.weight"].T
    out[c + "up"] = split[f"{p}.mlp.up_proj.weight"].T
    out[c + "down"] = hf[f"{p}.mlp.down_proj.weight"].T
    return out


def _split_fused(spec: ModelSpec, hf: dict, p: str) -> dict:
    """Phi-3's fused projections of layer `p` under the unfused names: q, k, v from the rows of
    `qkv_proj`, gate and up from those of `gate_up_proj`."""
    N, K, H, F = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.mlp_dim
    qkv, gate_up = hf[f"{p}.self_attn.qkv_proj.weight"], hf[f"{p}.mlp.gate_up_proj.weight"]
    return {f"{p}.self_attn.q_proj.weight": qkv[:N * H], f"{p}.self_attn.k_proj.weight": qkv[N * H:(N + K) * H],
            f"{p}.self_attn.v_proj.weight": qkv[(N + K) * H:], f"{p}.mlp.gate_proj.weight": gate_up[:F],
            f"{p}.mlp.up_proj.weight": gate_up[F:]}


# --- Google DeepMind's gemma (flattened Flax params, '/'-joined) --------------------------

def to_deepmind(spec: ModelSpec, canon: dict) -> dict[str, np.ndarray]:
    check_tensors(canon, canonical_shapes(spec), "canonical weights", spec)
    out = {"embedder/input_embedding": canon["embed"], "final_norm/scale": canon["final_norm"]}
    for i in range(spec.num_layers):
        out.update({f"layer_{i}/{k}": v for k, v in to_deepmind_layer(spec, i, canon).items()})
    return out


def to_deepmind_layer(spec: ModelSpec, i: int, canon: dict, stack=np.stack) -> dict:
    """Layer i's DeepMind tensors ('attn/q_einsum/w', ...) from its canonical ones. `stack`:
    the array framework's stack (jnp.stack converts on the device)."""
    c = f"L{i}."
    out = {"pre_attention_norm/scale": canon[c + "attn_norm"]}
    if spec.num_heads == spec.num_kv_heads:  # DeepMind fuses q, k, v when K == N
        out["attn/qkv_einsum/w"] = stack([canon[c + "q"], canon[c + "k"], canon[c + "v"]])
    else:
        out["attn/q_einsum/w"] = canon[c + "q"]  # (N, D, H)
        out["attn/kv_einsum/w"] = stack([canon[c + "k"], canon[c + "v"]])  # (2, K, D, H)
    out["attn/attn_vec_einsum/w"] = canon[c + "o"]  # (N, H, D)
    if spec.qk_norm:
        out["attn/_query_norm/scale"] = canon[c + "q_norm"]  # (H,)
        out["attn/_key_norm/scale"] = canon[c + "k_norm"]
    if spec.qkv_bias:  # not in DeepMind's layout (no Gemma has them): the oracle's own names
        out["attn/q_bias"], out["attn/k_bias"], out["attn/v_bias"] = (canon[c + n] for n in ("q_bias", "k_bias", "v_bias"))
    if spec.post_attn_norm:
        out["post_attention_norm/scale"] = canon[c + "post_attn_norm"]
    out["pre_ffw_norm/scale"] = canon[c + "mlp_norm"]
    gating = stack([canon[c + "gate"], canon[c + "up"]])  # (2, D, F)
    # `transpose_gating_einsum` checkpoints (Gemma 2 9B/27B, Gemma 3) store (2, F, D).
    out["mlp/gating_einsum"] = gating.mT if spec.transpose_gating else gating
    out["mlp/linear"] = canon[c + "down"]  # (F, D)
    if spec.post_mlp_norm:
        out["post_ffw_norm/scale"] = canon[c + "post_mlp_norm"]
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
            f"{p}/pre_ffw_norm/scale": (D,),
            f"{p}/mlp/gating_einsum": (2, F, D) if spec.transpose_gating else (2, D, F),
            f"{p}/mlp/linear": (F, D),
        })
        if spec.qk_norm:
            shapes.update({f"{p}/attn/_query_norm/scale": (H,), f"{p}/attn/_key_norm/scale": (H,)})
        if spec.post_attn_norm:
            shapes[f"{p}/post_attention_norm/scale"] = (D,)
        if spec.post_mlp_norm:
            shapes[f"{p}/post_ffw_norm/scale"] = (D,)
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
        if spec.qk_norm:
            out[c + "q_norm"] = dm[f"{p}/attn/_query_norm/scale"]
            out[c + "k_norm"] = dm[f"{p}/attn/_key_norm/scale"]
        if spec.post_attn_norm:
            out[c + "post_attn_norm"] = dm[f"{p}/post_attention_norm/scale"]
        out[c + "mlp_norm"] = dm[f"{p}/pre_ffw_norm/scale"]
        gating = dm[f"{p}/mlp/gating_einsum"]
        if spec.transpose_gating:
            gating = gating.transpose(0, 2, 1)  # (2, F, D) -> (2, D, F)
        out[c + "gate"], out[c + "up"] = gating
        out[c + "down"] = dm[f"{p}/mlp/linear"]
        if spec.post_mlp_norm:
            out[c + "post_mlp_norm"] = dm[f"{p}/post_ffw_norm/scale"]
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
