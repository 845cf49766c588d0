"""The files of an HF checkpoint directory, read safely: the one owner of which files are
weights, which are pickles or code, and how a JSON file of a checkpoint is read.

Everything here treats a checkpoint as hostile input:
- only regular files are opened (a FIFO, a device or a symlink loop is refused before it is
  opened for reading, so nothing blocks), and never more than a size limit of JSON;
- JSON must decode as UTF-8 and be of the expected type;
- weights are chosen by transformers' own rule with `use_safetensors=True` (the safetensors index,
  else `model.safetensors`), so llmdiff's reader and every implementation read the same files;
  other `*.safetensors` files are reported as stray, never read; pickles are never opened.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from llmdiff.errors import WeightsError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_INDEX = ".bin.index.json"   # the shard index of pickled weights: reported with them
CODE_SUFFIXES = (".py", ".pyc", ".so")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
JSON_LIMIT = 64 << 20  # no config or tokenizer JSON of a real checkpoint comes near this


def open_regular(path, what: str = "file") -> int:
    """A read-only descriptor of `path`, which must be a regular file (symlinks to one are fine).

    Opened non-blocking, so a FIFO is detected instead of waiting for a writer forever."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise WeightsError(f"{path} does not exist") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot open {what}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device")
        raise WeightsError(f"{path} is {kind}, not a regular file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd


def read_bytes(path, limit: int, what: str = "file") -> bytes:
    fd = open_regular(path, what)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise WeightsError(f"{path}: over {limit >> 20} MiB, too large for a {what}")
    return data


def read_json(path, *, expect: type | None = dict, what: str = "JSON file"):
    """The parsed JSON of `path`; one-line WeightsError when it is not a regular file, not UTF-8,
    not JSON, or (when `expect` is given) not of that type."""
    data = read_bytes(path, JSON_LIMIT, what)
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise WeightsError(f"{path}: not UTF-8 text (byte {e.start}); fix or re-download it") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix or re-download it") from None
    except RecursionError:
        raise WeightsError(f"{path}: JSON nested too deeply") from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "object", list: "array"}.get(expect, expect.__name__)
        raise WeightsError(f"{path}: expected a JSON {kind}, found {type(value).__name__}")
    return value


def optional_json(path) -> dict | None:
    """A JSON object file of the checkpoint, None when absent. A dangling symlink, FIFO or device
    is not absent: `read_json` refuses it (one line), as it does non-UTF-8, non-JSON or a non-object."""
    return read_json(path) if os.path.lexists(path) else None


def bad_shard_names(weight_map: dict) -> list:
    """The shard names of an index's `weight_map` that are not plain file names of the directory
    (a list, "../x"): never joined to the directory's path."""
    return [f for f in weight_map.values() if not isinstance(f, str) or "/" in f or "\\" in f or f in ("", ".", "..")]


@dataclass
class WeightFiles:
    """The weight files of a checkpoint by transformers' rule, and what else lies there."""
    files: list[str]                               # names, in the order they are read
    index: str | None = None                       # the index file, when the checkpoint is sharded
    stray: list[str] = field(default_factory=list)     # other *.safetensors: never read
    pickles: list[str] = field(default_factory=list)   # never opened
    code: list[str] = field(default_factory=list)      # never executed


def weight_files(directory) -> WeightFiles:
    """Which files of `directory` hold the weights: the shards named by
    `model.safetensors.index.json`, else `model.safetensors` (what `from_pretrained(dir,
    use_safetensors=True)` reads). WeightsError, one line, when there are none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsError(f"{directory} is not a directory (expected an HF checkpoint directory)")
    names = sorted(p.name for p in directory.iterdir())
    pickles = [n for n in names if is_pickle(n)]
    code = [n for n in names if is_code(n)]
    tensors = [n for n in names if n.endswith(".safetensors")]
    if INDEX in names:
        index = read_json(directory / INDEX, what="safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{directory / INDEX}: no weight_map object")
        bad = bad_shard_names(weight_map)    # before dict.fromkeys: a list value is unhashable
        if bad:
            raise WeightsError(f"{directory / INDEX}: weight_map names {bad[0]!r}, not a file of the directory")
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if f not in names]
        if missing:
            raise WeightsError(f"{directory / INDEX}: shard {missing[0]} is missing")
        chosen, index_name = files, INDEX
    elif SINGLE in names:
        chosen, index_name = [SINGLE], None
    else:
        raise no_weights(directory, tensors, pickles)
    for name in chosen:
        open_regular_close(directory / name, "weights file")
    return WeightFiles(chosen, index_name, [n for n in tensors if n not in chosen], pickles, code)


def is_pickle(name: str) -> bool:
    """A pickled weights file (or the index of some), by name: never opened."""
    return name.endswith(PICKLE_SUFFIXES) or name.endswith(PICKLE_INDEX)


def is_code(name: str) -> bool:
    """A file of code, by name: never imported or executed."""
    return name.endswith(CODE_SUFFIXES)


def no_weights(directory, tensors: list[str], pickles: list[str]) -> WeightsError:
    """The error for a directory with neither weights file transformers reads."""
    found = tensors or pickles
    hint = (f" (found {', '.join(found[:3])}" + (": llmdiff never unpickles; convert it to safetensors)"
                                                if not tensors else ": rename it model.safetensors)")) if found else ""
    return WeightsError(f"{directory} has no {SINGLE} or {INDEX}{hint}")


def open_regular_close(path, what: str) -> None:
    os.close(open_regular(path, what))


def remote_code(directory, config: dict | None) -> list[str]:
    """What in the checkpoint would make transformers run the checkpoint's own Python: the
    config's `auto_map` (or the tokenizer config's) and Python files. Empty when none."""
    directory = Path(directory)
    found = []
    for name, cfg in (("config.json", config),
                      ("tokenizer_config.json", _maybe_json(directory / "tokenizer_config.json"))):
        if isinstance(cfg, dict) and cfg.get("auto_map"):
            found.append(f"{name} has auto_map")
    found += [n for n in sorted(p.name for p in directory.iterdir()) if is_code(n)]
    return found


def _maybe_json(path):
    if not os.path.lexists(path):
        return None
    try:
        return read_json(path, expect=None)
    except WeightsError:
        return None
