"""The audit's inventory of a checkpoint directory: its files by kind, a `TensorRecord` for
every tensor its safetensors headers declare, and what is wrong with each file (overlapping or
unaccounted bytes, a tensor in two files, a shard index that disagrees with the shards),
reported per file rather than raised, so that `safetensors-file-corrupt` can name them all.
Which files are weights, pickles or code, and how they are opened, is `checkpoint_files`'s.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmdiff import checkpoint_files, safetensors_file
from llmdiff.audit_stream import TensorRecord
from llmdiff.errors import WeightsError


def _safetensors_records(path: Path, name: str) -> tuple[list[TensorRecord], list[str]]:
    """The tensors of one file, and what is wrong with it beyond what `read_header` rejects."""
    header, start = safetensors_file.read_header(path)   # raises WeightsError on a broken file
    records, problems = [], []
    for tname, info in header.items():   # types and sizes checked by read_header
        lo, hi = info["data_offsets"]
        records.append(TensorRecord(tname, name, info["dtype"], tuple(info["shape"]), start + lo, hi - lo))
    records.sort(key=lambda r: r.start)
    end = start
    for r in records:
        if r.start < end:
            problems.append(f"{name}: tensor {r.name!r} overlaps the tensor before it (starts at byte"
                            f" {r.start}, previous ends at {end})")
        elif r.start > end:
            problems.append(f"{name}: {r.start - end} unaccounted bytes before tensor {r.name!r}")
        end = max(end, r.start + r.nbytes)
    size = path.stat().st_size
    if size > end:
        problems.append(f"{name}: {size - end} bytes after the last tensor (ends at {end}, file has {size})")
    return records, problems


def _index_problems(index: dict, directory: Path, records: dict) -> list[str]:
    name = "model.safetensors.index.json"
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        return [f"{name}: no weight_map object"]
    # A shard name that is not a plain file name of the directory: reported, and its tensors
    # count as in no shard.
    bad = checkpoint_files.bad_shard_names(weight_map)
    problems = [f"{name}: weight_map names {bad[0]!r}, not a file of the directory"] if bad else []
    weight_map = {t: f for t, f in weight_map.items() if f not in bad}
    missing_files = sorted({f for f in weight_map.values() if not (directory / f).exists()})
    if missing_files:
        problems.append(f"{name}: shard {missing_files[0]} is missing"
                        + (f" (and {len(missing_files) - 1} more)" if len(missing_files) > 1 else ""))
    wrong = [t for t, f in weight_map.items() if (directory / f).exists() and t in records
             and records[t].file != f]
    absent = [t for t, f in weight_map.items() if (directory / f).exists() and t not in records]
    unlisted = [t for t in records if t not in weight_map]
    for what, names in (("is listed in another shard than the one holding it", wrong),
                        ("is listed but in no shard", absent), ("is in a shard but not listed", unlisted)):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            problems.append(f"{name}: tensor {names[0]!r}{more} {what}")
    return problems


def discover(directory: Path) -> tuple[dict, dict, dict]:
    """Files by kind, tensor records by name, and file problems by file name. WeightsError
    (exit 2) when there are no weights to audit or a weights file is not a regular file."""
    files = {"safetensors": [], "pickle": [], "code": [], "index": []}
    for p in sorted(directory.iterdir()):
        # Weights and the index by name whatever they are (a FIFO, a symlink loop, a directory
        # named model.safetensors is a broken checkpoint, not an absent file); pickles and code
        # are reported only when they are files.
        if p.suffix == ".safetensors":
            files["safetensors"].append(p.name)
        elif p.name == checkpoint_files.INDEX:
            files["index"].append(p.name)
        elif not p.is_file():
            continue
        elif checkpoint_files.is_pickle(p.name):
            files["pickle"].append(p.name)
        elif checkpoint_files.is_code(p.name):
            files["code"].append(p.name)
    # transformers reads the index, else model.safetensors. With neither there is nothing to
    # audit (exit 2), except a pickle-only checkpoint: `pickle-weights-present` reports that.
    if (not files["index"] and checkpoint_files.SINGLE not in files["safetensors"]
            and not (files["pickle"] and not files["safetensors"])):
        raise checkpoint_files.no_weights(directory, files["safetensors"], files["pickle"])
    for name in files["safetensors"]:   # a FIFO would block, a loop cannot be read: exit 2 at once
        checkpoint_files.open_regular_close(directory / name, "weights file")
    records, file_errors = {}, {}
    files["unreadable"] = []      # safetensors files whose header cannot be read: tensors unknown
    for name in files["safetensors"]:
        try:
            recs, problems = _safetensors_records(directory / name, name)
        except WeightsError as e:
            file_errors.setdefault(name, []).append(str(e).replace(str(directory) + os.sep, ""))
            files["unreadable"].append(name)
            continue
        for r in recs:
            if r.name in records:
                problems.append(f"{name}: tensor {r.name!r} is also in {records[r.name].file}")
            else:
                records[r.name] = r
        if problems:
            file_errors.setdefault(name, []).extend(problems)
    if files["index"]:
        index = checkpoint_files.read_json(directory / files["index"][0], expect=None, what="safetensors index")
        problems = _index_problems(index, directory, records)
        if problems:
            file_errors.setdefault(files["index"][0], []).extend(problems)
    return files, records, file_errors


__all__ = ["discover"]
