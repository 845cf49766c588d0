"""Read a Google DeepMind Orbax/Flax checkpoint directory into the canonical weight set.

    llmdiff compare gemma-7b --weights deepmind:/path/to/gemma-7b-checkpoint

This reads the checkpoint with `orbax-checkpoint` directly (into numpy, on the host), not with
`gemma.gm.ckpts`, which does not import with current kauldron releases, and so it needs only
the core install (orbax-checkpoint comes with flax). Every implementation then gets the same
numbers: the canonical set is converted to each one's layout as for any other weights.

The parameter trees Google has published and gemma 3.3.0 writes (`gm.ckpts` names them):
- FLAT (the released Gemma 1/2/3 checkpoints): `{'transformer/layer_0/attn/qkv_einsum': {'w':
  ...}, 'transformer/layer_0/mlp/gating_einsum': {'w': ...}, 'transformer/embedder': ...}`;
- NESTED (`gm.ckpts.save_params`, `model.init()` params): `{'layer_0': {'mlp': {'gating_einsum':
  ...}}}`;
- STACKED (later Gemma 3 releases): layers of one attention type stacked along a first axis,
  `transformer/stacked_layers/attention_type_{p}/...`, layer = slice * pattern + p;
- KAULDRON (a `kd.train.Trainer` checkpoint): the NESTED tree under `params`, in `default/`.
Multimodal parameters (the SigLIP vision encoder and its projection) are skipped: llmdiff
compares the text model.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from llmdiff import convert
from llmdiff.errors import WeightsError
from llmdiff.spec import ModelSpec

PREFIX = "deepmind:"
_MULTIMODAL = ("vision_encoder/", "SigLiPFromPatches_0/", "embedder/mm_input_projection/",
               "embedder/mm_soft_embedding_norm/", "embedder/audio_input_embedding")
_STACKED = re.compile(r"^stacked_layers/attention_type_(\d+)/(.*)$")


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def _restore(path: Path) -> dict:
    """The checkpoint's whole tree as numpy arrays (no device, no sharding)."""
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax logs every restore at INFO
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    try:
        meta = checkpointer.metadata(path)
        if getattr(meta, "item_metadata", None) is None and (path / "_CHECKPOINT_METADATA").exists() \
                and (path / "default").is_dir():
            path = path / "default"  # a Kauldron trainer checkpoint keeps the params here
            meta = checkpointer.metadata(path)
        tree = getattr(meta, "item_metadata", None)
        tree = getattr(tree, "tree", tree)
        if not tree:
            raise WeightsError(f"{path}: an Orbax checkpoint without item metadata; cannot read its parameters")
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(tree))
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax raises many types; the user needs one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"{path}: cannot read the Orbax checkpoint ({type(e).__name__}: {first})") from None


def deepmind_params(tree: dict) -> tuple[dict[str, np.ndarray], list[str]]:
    """Any published layout -> flat '/'-joined DeepMind names (`convert.to_deepmind`'s), skipped names."""
    if "params" in tree and isinstance(tree["params"], dict):  # KAULDRON
        tree = tree["params"]
    flat = _flatten(tree)
    if flat and all(k.startswith(("transformer/", "SigLiPFromPatches_0/")) for k in flat):  # FLAT, STACKED
        flat = {k.removeprefix("transformer/"): v for k, v in flat.items()}
    pattern = 1 + max((int(m.group(1)) for k in flat if (m := _STACKED.match(k))), default=-1)
    out, skipped = {}, []
    for key, value in flat.items():
        # FLAT checkpoints keep the MLP weights as `mlp/gating_einsum/w`; NESTED as `mlp/gating_einsum`.
        key = re.sub(r"/mlp/(gating_einsum|linear)/w$", r"/mlp/\1", key)
        if key.startswith(_MULTIMODAL):
            skipped.append(key)
        elif m := _STACKED.match(key):
            for s, layer_value in enumerate(np.asarray(value)):  # (slices, ...) -> one per layer
                out[f"layer_{s * pattern + int(m.group(1))}/{m.group(2)}"] = layer_value
        else:
            out[key] = value
    return out, skipped


def read_deepmind_checkpoint(path, spec: ModelSpec) -> tuple[dict[str, np.ndarray], dict]:
    """The canonical set (float32) of an Orbax checkpoint directory, and what was skipped."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights path {path} does not exist")
    if not path.is_dir():
        raise WeightsError(f"weights path {path} is not a directory (expected an Orbax checkpoint directory)")
    if not any((path / f).exists() for f in ("_METADATA", "checkpoint", "manifest.ocdbt", "_CHECKPOINT_METADATA")):
        raise WeightsError(f"{path} is not an Orbax checkpoint (no _METADATA, checkpoint or manifest.ocdbt file)")
    params, skipped = deepmind_params(_restore(path))
    layers = {int(m.group(1)) for k in params if (m := re.match(r"layer_(\d+)/", k))}
    embed = params.get("embedder/input_embedding")
    if embed is not None and (len(layers), *embed.shape) != (spec.num_layers, spec.vocab_size, spec.hidden_size):
        tiny = "" if spec.tiny else " (a tiny checkpoint needs --tiny)"
        raise WeightsError(
            f"{path}: a checkpoint with {len(layers)} layers, vocab {embed.shape[0]} and hidden {embed.shape[1]},"
            f" but {spec.name} has {spec.num_layers}, {spec.vocab_size} and {spec.hidden_size}{tiny}")
    canon = convert.from_deepmind(spec, params, where=str(path))
    return {k: np.asarray(v, dtype=np.float32) for k, v in canon.items()}, {"skipped": skipped}
