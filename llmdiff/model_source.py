"""What a MODEL argument names, for `compare`, `audit` and `tokenize`: a registered model
(`gemma-7b`, a shortcut to its published config), a local HF checkpoint directory, or a hub id
(`google/gemma-7b`, resolved through huggingface_hub's own cache and offline rules). The one
owner of that decision, and of the files a registered model was published with.

A checkpoint's spec is its config.json's (`hf_format.spec_from_config`): any size, any vocabulary,
any number of layers of a family llmdiff knows.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from llmdiff import hf_format
from llmdiff.errors import UsageError, WeightsError
from llmdiff.spec import ModelSpec, get_spec, model_names

# The files a hub snapshot brings: config, tokenizer and safetensors weights. Never pickles
# (*.bin, *.pt) and never code (*.py): llmdiff reads neither.
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "*.safetensors",
             "model.safetensors.index.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONFIG_MODES = ("published", "corrected")


@dataclass(frozen=True)
class Model:
    """A resolved MODEL argument."""

    spec: ModelSpec
    origin: str                       # "registered", "path" or "hub"
    checkpoint: Path | None = None    # the checkpoint directory (a path given, or hub's snapshot)
    published: dict = field(default_factory=dict)  # registered: {file name: its JSON, as published}
    sources: dict = field(default_factory=dict)    # file name -> where that copy was read

    @property
    def info(self) -> dict:
        """What the report says of where the model came from."""
        out = {"origin": self.origin, "name": self.spec.name}
        if self.checkpoint is not None:
            out["checkpoint"] = str(self.checkpoint)
        if self.sources:
            out["published_sources"] = self.sources
        return out


def resolve(model: str, *, tiny: bool = False, revision: str | None = None) -> Model:
    """A registered name, else an existing directory, else a hub id; anything else is one line."""
    model = os.fspath(model)   # the Python API may be given a Path
    if model in model_names():
        if revision is not None:
            raise UsageError(f"--revision is for hub ids; {model} is a registered model")
        spec = get_spec(model, tiny=tiny)
        files, sources = published(model)
        return Model(spec, "registered", published=files, sources=sources)
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")) or os.sep in model and not _HUB_ID.match(model):
        if tiny:
            raise UsageError(f"--tiny shrinks a registered model; {model} is a checkpoint, compared as it is")
        if revision is not None:
            raise UsageError(f"--revision is for hub ids; {model} is a local path")
        return Model(checkpoint_spec(path), "path", checkpoint=path)
    if _HUB_ID.match(model):
        if tiny:
            raise UsageError(f"--tiny shrinks a registered model; {model} is a checkpoint, compared as it is")
        snapshot = hub_snapshot(model, revision)
        return Model(checkpoint_spec(snapshot, name=model), "hub", checkpoint=snapshot)
    get_spec(model)   # the unknown-model error, with the closest names
    raise AssertionError(model)  # pragma: no cover


def checkpoint_dir(model: str, revision: str | None = None) -> Path:
    """A checkpoint directory argument (`audit`): the directory itself, or a hub id's snapshot."""
    path = Path(model).expanduser()
    if not path.exists() and _HUB_ID.match(model):
        return hub_snapshot(model, revision)
    if revision is not None:
        raise UsageError(f"--revision is for hub ids; {model} is a local path")
    return path


def checkpoint_spec(path: Path, name: str | None = None) -> ModelSpec:
    """The spec of a local checkpoint directory: its config.json's."""
    from llmdiff import checkpoint_files

    if not path.exists():
        raise WeightsError(f"{path} does not exist (give a registered model, a checkpoint directory or a hub id)")
    if not path.is_dir():
        raise WeightsError(f"{path} is not a directory (expected an HF checkpoint directory)")
    config_path = path / "config.json"
    if not os.path.lexists(config_path):
        raise WeightsError(f"{path} has no config.json (expected an HF checkpoint directory)")
    config = checkpoint_files.read_json(config_path, what="config")
    if hf_format.family_of(config) is None:
        code = checkpoint_files.remote_code(path, config)
        why = f"; it needs the checkpoint's own code ({', '.join(code)}), which llmdiff never runs" if code else ""
        model_type = hf_format.text_config(config).get("model_type")
        raise WeightsError(f"{config_path}: model_type {model_type!r} is not a family llmdiff knows"
                           f" ({', '.join(sorted(hf_format.ARCHITECTURES))}){why}")
    return hf_format.spec_from_config(config, name or path.resolve().name, file=str(config_path))


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot of a hub repo: hub's cache when it holds it (never downloaded again),
    else hub's normal download with its progress bar; `HF_HUB_OFFLINE=1` never downloads."""
    import huggingface_hub
    from huggingface_hub import errors

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    at = f"@{revision}" if revision else ""
    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_FILES, local_files_only=offline))
    except errors.LocalEntryNotFoundError as e:
        where = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise UsageError(f"{repo_id}{at}: not in the hub cache and {where} ({str(e).splitlines()[0]})") from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.GatedRepoError) as e:
        raise UsageError(f"{repo_id}{at}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    except (OSError, ValueError, errors.HfHubHTTPError) as e:
        raise UsageError(f"{repo_id}{at}: the hub snapshot could not be read: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None


# --- the files a registered model was published with ---------------------------------------

def published(name: str) -> tuple[dict, dict]:
    """({file name: JSON}, {file name: source}) as the model's publisher put them on the hub,
    from llmdiff/data/published/<name>.json; ({}, {}) for a model without a recorded copy."""
    data = resources.files("llmdiff").joinpath("data", "published", f"{name}.json")
    if not data.is_file():
        return {}, {}
    record = json.loads(data.read_text())
    return record["files"], record.get("sources", {})


# The config.json keys a tiny model takes from its own spec (everything the shrinking changes);
# every other published field stays as published.
_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_TINY_KEYS = (*hf_format.CONFIG_FIELDS, "max_position_embeddings", "query_pre_attn_scalar", "sliding_window",
              "layer_types", "sliding_window_pattern", *_SPECIAL_IDS)


def checkpoint_files(model: Model, mode: str = "published", dtype: str = "bfloat16") -> dict[str, dict]:
    """The JSON files of the random-weight checkpoint llmdiff writes for a registered model.

    published: config.json, generation_config.json and tokenizer_config.json as the publisher's
    (a tiny model's sizes and special ids its own), so an old release runs the code paths its
    users hit (google/gemma-7b's `"hidden_act": "gelu"`). corrected: config.json written from the
    spec, every field explicit (`weights.hf_config`), to test the modelling code alone.
    A multimodal config (Gemma 3 4B and up) contributes its language model's part, as
    Gemma3ForCausalLM reads it.
    """
    from llmdiff import weights

    if mode not in CONFIG_MODES:
        raise UsageError(f"unknown --config {mode!r}; choose {' or '.join(CONFIG_MODES)}")
    spec = model.spec
    own = weights.hf_config(spec, dtype)
    if mode == "corrected" or "config.json" not in model.published:
        return {"config.json": own}
    config = copy.deepcopy(model.published["config.json"])
    if isinstance(config.get("text_config"), dict):
        config = {**config["text_config"], "architectures": own["architectures"], "model_type": own["model_type"]}
    out = {"config.json": config}
    if spec.tiny:
        for key in _TINY_KEYS:   # the sizes and the tiny tokenizer's special ids always; the rest where published
            if key in own and (key in config or key in (*hf_format.CONFIG_FIELDS, *_SPECIAL_IDS)):
                config[key] = own[key]
        if isinstance(config.get("rope_scaling"), dict) and isinstance(own.get("rope_scaling"), dict):
            config["rope_scaling"] = {**config["rope_scaling"], **own["rope_scaling"]}
        generation = model.published.get("generation_config.json")
        if generation is not None:
            out["generation_config.json"] = {
                **generation, **{k: own[k] for k in _SPECIAL_IDS if k in generation}}
        return out   # a tiny model's tokenizer is the tiny one, with its own tokenizer_config.json
    for name in ("generation_config.json", "tokenizer_config.json"):
        if name in model.published:
            out[name] = copy.deepcopy(model.published[name])
    return out
