"""Load checks from the entry-point group `llmdiff.checks` and select among them.

A broken plugin (import error, bad code, missing docs) is reported by name and skipped; it
never stops a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

from llmdiff.check import Check, problems_with
from llmdiff.errors import UsageError

ENTRY_POINT_GROUP = "llmdiff.checks"


@dataclass
class BrokenCheck:
    entry_point: str
    problem: str

    def __str__(self):
        return f"check plugin {self.entry_point!r} skipped: {self.problem}"


def load_checks() -> tuple[list[Check], list[BrokenCheck]]:
    checks, broken, seen = [], [], {}
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        label = f"{ep.name} = {ep.value}"
        try:
            cls = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin never breaks the run
            broken.append(BrokenCheck(label, f"cannot import: {type(e).__name__}: {e}"))
            continue
        problems = problems_with(cls)
        if not problems and (cls.code in seen or cls.name in seen):
            problems = [f"code {cls.code} or name {cls.name} already used by {seen.get(cls.code) or seen.get(cls.name)}"]
        if problems:
            broken.append(BrokenCheck(label, "; ".join(problems)))
            continue
        seen[cls.code] = seen[cls.name] = label
        checks.append(cls())
    return sorted(checks, key=lambda c: c.code), broken


def _matches(check: Check, selector: str) -> bool:
    return check.name == selector or check.code.startswith(selector.upper())


def select(checks: list[Check], select=(), ignore=()) -> list[Check]:
    """Keep checks matching any `select` (all when empty), minus any `ignore`: codes, names, prefixes."""
    for s in (*select, *ignore):
        if not any(_matches(c, s) for c in checks):
            known = ", ".join(c.code for c in checks)
            raise UsageError(f"no check matches {s!r}; codes are {known} (prefixes like LD4 work too)")
    kept = [c for c in checks if not select or any(_matches(c, s) for s in select)]
    return [c for c in kept if not any(_matches(c, s) for s in ignore)]


def find(checks: list[Check], code_or_name: str) -> Check:
    for c in checks:
        if code_or_name in (c.code, c.name) or c.code == code_or_name.upper():
            return c
    raise UsageError(f"no check {code_or_name!r}; `llmdiff checks list` shows them")
