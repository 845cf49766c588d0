"""Project configuration: `[tool.llmdiff]` in pyproject.toml, or an `llmdiff.toml`.

    [tool.llmdiff]
    implementations = ["hf"]
    dtypes = ["float32", "bfloat16"]
    reference = "oracle"
    select = ["LD"]
    ignore = ["LD401"]
    floor_factor = 8.0
    [tool.llmdiff.thresholds]      # per-point factor by glob; first match wins
    "L*.q" = 16
    "logits" = 12

Command-line options override it. An unknown key is an error naming it and the allowed keys.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from llmdiff.errors import UsageError

ALLOWED = {
    "implementations": list, "dtypes": list, "reference": str, "seed": int, "attn": str,
    "select": list, "ignore": list, "floor_factor": (int, float), "thresholds": dict, "timeout": (int, float),
    "baseline_factor": (int, float),
}


def find_config(start: Path | None = None) -> tuple[dict, Path | None]:
    """The configuration found in `start` (default: the current directory) and its file."""
    start = Path(start or Path.cwd())
    own = start / "llmdiff.toml"
    if own.exists():
        return _validate(_read(own), own), own
    pyproject = start / "pyproject.toml"
    if pyproject.exists():
        section = _read(pyproject).get("tool", {}).get("llmdiff")
        if section is not None:
            return _validate(section, pyproject, "[tool.llmdiff]"), pyproject
    return {}, None


def _read(path: Path) -> dict:
    from llmdiff import checkpoint_files
    from llmdiff.errors import WeightsError

    try:
        return tomllib.loads(checkpoint_files.read_bytes(path, 1 << 20, "configuration").decode("utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except WeightsError as e:
        raise UsageError(str(e)) from None


def _validate(config: dict, path: Path, where: str = "") -> dict:
    label = f"{path}{' ' + where if where else ''}"
    for key, value in config.items():
        if key not in ALLOWED:
            raise UsageError(f"{label}: unknown key {key!r}; allowed keys: {', '.join(sorted(ALLOWED))}")
        if not isinstance(value, ALLOWED[key]) or isinstance(value, bool) and ALLOWED[key] is not bool:
            kinds = ALLOWED[key] if isinstance(ALLOWED[key], tuple) else (ALLOWED[key],)
            raise UsageError(f"{label}: {key} must be {' or '.join(k.__name__ for k in kinds)}, "
                             f"not {type(value).__name__}")
    for key in ("implementations", "dtypes"):
        if key in config and (not config[key] or not all(isinstance(v, str) and v for v in config[key])):
            raise UsageError(f"{label}: {key} must be a non-empty list of names")
    for key in ("timeout", "floor_factor", "baseline_factor"):
        if key in config and not config[key] > 0:
            raise UsageError(f"{label}: {key} must be a positive number, not {config[key]}")
    for pattern, factor in config.get("thresholds", {}).items():
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise UsageError(f"{label}: thresholds.{pattern!r} must be a positive number")
    return config
