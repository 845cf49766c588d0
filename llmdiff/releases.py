"""Which release of an implementation broke (or fixed) a model: `llmdiff matrix` and `bisect`.

    llmdiff matrix gemma-7b --tiny --impl hf --versions transformers==4.57.6,transformers==5.0.0
    llmdiff bisect gemma-7b --tiny --impl hf --good transformers==4.57.6 --bad transformers==5.2.0

Each release gets a virtualenv of its own, kept and reused across runs
(`$LLMDIFF_VENVS/releases/PACKAGE-VERSION`): seeing the packages of the interpreter
llmdiff runs under after its own (a .pth file), so the heavy framework (torch) is shared and only
the release and what it pins are installed into it (with uv where it is on PATH, else pip). A release range
needs pins of its own on a current machine; they come from `CONSTRAINTS` below and are reported.
Then one `compare` per release, the implementation run under that venv's interpreter
(`NAME@PYTHON`), against the oracle. A release that cannot be installed or cannot load the model
says why in its cell; the others are unaffected.

`bisect` searches the releases between a good and a bad one (from the package index) for the
first whose verdict (or the named finding) changes, checking both ends first.
"""

from __future__ import annotations

import re
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from llmdiff.errors import UsageError

# Extra pins a release range needs to install and import next to a current torch and numpy.
# (package, specifier of its versions) -> pins. transformers before 4.45 was built against
# numpy 1 (measured here: 4.38–4.50 install and run with torch 2.13 and numpy<2).
CONSTRAINTS = {
    ("transformers", "<4.51"): ("numpy<2",),
    # DeepMind's gemma pulls TensorFlow, whose protobuf 6 cannot load sentencepiece 0.2.3's
    # (made with protobuf 7): constraints/deepmind.txt pins it the same way.
    ("gemma", ">=1"): ("sentencepiece<0.2.3",),
}


@dataclass(frozen=True)
class Release:
    package: str
    version: str

    @classmethod
    def parse(cls, text: str) -> "Release":
        """`package==version`."""
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([A-Za-z0-9_.\-+]+)\s*", text)
        if not m:
            raise UsageError(f"release {text!r}: expected PACKAGE==VERSION, e.g. transformers==4.57.6")
        return cls(m.group(1).lower(), m.group(2))

    def __str__(self) -> str:
        return f"{self.package}=={self.version}"

    def pins(self) -> tuple[str, ...]:
        from packaging.specifiers import SpecifierSet

        return tuple(p for (package, spec), pins in CONSTRAINTS.items()
                     if package == self.package and self.version in SpecifierSet(spec) for p in pins)


def index_versions(package: str) -> list[str]:
    """The package's releases on the index, oldest first (final releases only)."""
    from packaging.version import InvalidVersion, Version

    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package], capture_output=True,
                          text=True, timeout=120)
    m = re.search(r"Available versions:\s*(.*)", proc.stdout)
    if proc.returncode != 0 or not m:
        raise UsageError(f"cannot list the releases of {package} from the package index: "
                         f"{(proc.stderr.strip().splitlines() or ['no answer'])[-1]}")
    out = []
    for v in m.group(1).split(","):
        try:
            version = Version(v.strip())
        except InvalidVersion:
            continue
        if not (version.is_prerelease or version.is_devrelease):
            out.append(version)
    return [str(v) for v in sorted(out)]


def resolve(text: str, *, every: bool = False, versions: list[str] | None = None) -> list[Release]:
    """`pkg==A,pkg==B` as given; or a range `pkg>=A,<B` resolved against the index: the newest
    patch of each minor release in it (every release with `every`)."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import Version

    parts = [p.strip() for p in text.split(",") if p.strip()]
    if all("==" in p for p in parts):
        return [Release.parse(p) for p in parts]
    try:
        req = Requirement(text)
    except InvalidRequirement:
        raise UsageError(f"--versions {text!r}: expected PKG==V[,PKG==V...] or a range such as "
                         "'transformers>=4.38,<4.45'") from None
    package = req.name.lower()
    found = [v for v in (versions if versions is not None else index_versions(package)) if v in req.specifier]
    if not found:
        raise UsageError(f"no release of {package} on the index is in {req.specifier}")
    if not every:  # the newest patch of each minor
        newest: dict = {}
        for v in found:
            key = Version(v).release[:2]
            if key not in newest or Version(v) > Version(newest[key]):
                newest[key] = v
        found = sorted(newest.values(), key=Version)
    return [Release(package, v) for v in found]


def between(package: str, good: str, bad: str, versions: list[str] | None = None) -> list[str]:
    """The releases from `good` to `bad` inclusive (either order), oldest first."""
    from packaging.version import Version

    versions = versions if versions is not None else index_versions(package)
    lo, hi = sorted((Version(good), Version(bad)))
    found = [v for v in versions if lo <= Version(v) <= hi]
    for end in (good, bad):
        if end not in found:
            raise UsageError(f"{package}=={end} is not a release on the index")
    return found


def venvs_root() -> Path:
    from llmdiff.runner import venvs_root as root

    return Path(root()) / "releases"


def python_for(release: Release, say=lambda m: None) -> str:
    """The interpreter of the release's own virtualenv, made and installed on first use."""
    venv = venvs_root() / f"{release.package}-{release.version}"
    python = venv / "bin" / "python"
    done = venv / ".llmdiff-installed"
    if done.exists() and python.exists():
        return str(python)
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    say(f"{release}: making its virtualenv ({', '.join(release.pins()) or 'no extra pins'})")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    # This interpreter's packages (torch, numpy, llmdiff's own needs) are seen after the venv's
    # own: a .pth file lists them (`--system-site-packages` would give the base interpreter's,
    # not this virtualenv's).
    own = next(venv.glob("lib/python*/site-packages"))
    (own / "_llmdiff_shared.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    wanted = [str(release), *release.pins()]
    uv = shutil.which("uv")
    cmd = ([uv, "pip", "install", "--python", str(python), *wanted] if uv else
           [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", *wanted])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
        raise RuntimeError(f"cannot install {release}: {lines[-1] if lines else 'the installer failed'}")
    done.write_text(" ".join(wanted) + "\n")
    return str(python)


@dataclass
class Cell:
    release: str
    pins: tuple = ()
    error: str | None = None
    runs: list = field(default_factory=list)      # per dtype: verdict, first divergence, codes
    exit_code: int | None = None
    versions: dict = field(default_factory=dict)  # what the implementation reported it ran on
    tokenizer: dict | None = None                 # its tokenizer parity: agree, findings, version, error


def run_release(model: str, impl: str, release: Release | None, *, implementation=None, say=lambda m: None,
                **compare_options) -> Cell:
    """One compare with `impl` from `release` (or `implementation`, an implementation string,
    for tests and for adapters that are not packages)."""
    from llmdiff import api

    label = str(release) if release is not None else implementation
    cell = Cell(label, release.pins() if release is not None else ())
    try:
        spec = implementation or f"{impl}@{python_for(release, say)}"
        say(f"{label}: comparing")
        report = api.compare(model, impls=[spec], **compare_options).report
    except Exception as e:  # noqa: BLE001 - one release that cannot run is that cell's error
        cell.error = f"{type(e).__name__}: {e}".splitlines()[0]
        return cell
    cell.exit_code = report["exit_code"]
    cell.versions = next((i["versions"] for i in report["implementations"] if i["name"] != api.ORACLE), {})
    failed = [i["error"] for i in report["implementations"] if not i["ok"]]
    if failed:
        cell.error = failed[0]
    cell.tokenizer = _tokenizer_cell(report)
    for run in report["runs"]:
        codes = sorted({f["code"] for f in report["findings"]
                        if f["implementation"] == run["candidate"] and f["dtype"] in (run["dtype"], None)})
        cell.runs.append({"dtype": run["dtype"], "verdict": run["verdict"],
                          "first_divergence": run["first_divergence"], "findings": codes})
    return cell


def _tokenizer_cell(report: dict) -> dict | None:
    """The release's tokenizer parity (run under its interpreter): whether it agrees with the
    reference, its LD0xx findings, the transformers release that tokenized; None when the model
    has no tokenizer."""
    parity = report.get("tokenizer")
    error = next((e["error"] for e in report.get("errors", []) if e["stage"] == "tokenizer parity"), None)
    if parity is None and error is None:
        return None
    hf = next((i for i in (parity or {}).get("implementations", []) if i["name"] == "hf"), {})
    return {"agree": (parity or {}).get("agree"), "error": error or (parity or {}).get("error"),
            "version": hf.get("version"),
            "findings": sorted({f["code"] for f in report["findings"] if f["implementation"] == "tokenizer"})}


def _tokenizer_text(t: dict | None) -> str:
    if t is None:
        return "-"
    if t.get("error"):
        return f"error: {t['error']}"
    return ("agree" if t.get("agree") else "differ") + (f" ({', '.join(t['findings'])})" if t["findings"] else "")


def is_bad(cell: Cell, finding: str | None) -> bool | None:
    """Whether a release shows the change looked for: the named finding, else a divergent run
    (or findings). None when the release could not run."""
    if cell.error and not cell.runs:
        return None
    tok = cell.tokenizer or {}
    if finding:
        return any(finding in r["findings"] for r in cell.runs) or finding in tok.get("findings", [])
    return any(r["verdict"] != "parity" or r["findings"] for r in cell.runs) or bool(tok.get("findings"))


def bisect(releases: list[str], evaluate, finding: str | None = None, say=lambda m: None) -> dict:
    """Binary search over `releases` (oldest first; the first is good, the last bad, checked) for
    the first bad one. `evaluate(release) -> Cell`. Releases that cannot run are skipped over,
    as `git bisect skip` does."""
    cells: dict[str, Cell] = {}

    def bad(i):
        r = releases[i]
        if r not in cells:
            say(f"bisect: {r}")
            cells[r] = evaluate(r)
        return is_bad(cells[r], finding)

    first, last = bad(0), bad(len(releases) - 1)
    if first is None or last is None:
        end = releases[0] if first is None else releases[-1]
        raise UsageError(f"bisect: {end} could not run: {cells[end].error}")
    if first == last:
        state = "bad" if first else "good"
        return {"result": f"both ends are {state}: nothing changes between them", "first_bad": None,
                "last_good": None, "cells": {k: v.__dict__ for k, v in cells.items()}}
    want = last  # looking for the first release whose state equals the last one's
    lo, hi = 0, len(releases) - 1  # lo: known not-`want`, hi: known `want`
    skipped = set()
    while hi - lo > 1:
        mid = (lo + hi) // 2
        probe = mid
        state = bad(probe)
        while state is None and probe < hi - 1:  # cannot run: try the next one towards hi
            skipped.add(probe)
            probe += 1
            state = bad(probe)
        if state is None:
            skipped.add(probe)
            break
        if state == want:
            hi = probe
        else:
            lo = probe
    change = "broke" if want else "fixed"
    return {"result": f"{releases[hi]} {change} it (the release before, {releases[lo]}, "
                      f"is {'good' if want else 'bad'})" + (f"; {len(skipped)} release(s) could not run" if skipped else ""),
            "first_bad" if want else "first_good": releases[hi], "before": releases[lo],
            "cells": {k: v.__dict__ for k, v in cells.items()}}


def matrix_rows(cells: list[Cell]) -> tuple[list[str], list[list[str]]]:
    """The release x dtype table (with a tokenizer column where any release has a tokenizer):
    its header and its rows of cell texts."""
    dtypes = list(dict.fromkeys(r["dtype"] for c in cells for r in c.runs)) or ["float32"]
    tokenizer = any(c.tokenizer is not None for c in cells)
    header = ["release", *dtypes] + (["tokenizer"] if tokenizer else [])
    rows = []
    for c in cells:
        by = {r["dtype"]: r for r in c.runs}
        row = []
        for d in dtypes:
            r = by.get(d)
            if r is None or (r["verdict"] == "error" and c.error):
                row.append(f"error: {c.error}" if c.error else "-")
            else:
                where = f" at {r['first_divergence']}" if r["first_divergence"] else ""
                codes = f" ({', '.join(r['findings'])})" if r["findings"] else ""
                row.append(f"{r['verdict']}{where}{codes}")
        pins = f" [{', '.join(c.pins)}]" if c.pins else ""
        rows.append([f"{c.release}{pins}", *row] + ([_tokenizer_text(c.tokenizer)] if tokenizer else []))
    return header, rows


def matrix_lines(cells: list[Cell]) -> list[str]:
    """The table as text lines (terminal and Markdown alike)."""
    header, rows = matrix_rows(cells)
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def matrix_html(model: str, impl: str, cells: list[Cell]) -> str:
    """The table as a standalone HTML page, each cell coloured by its state."""
    import html

    header, rows = matrix_rows(cells)

    def css(text: str) -> str:
        return ("error" if text.startswith("error") else "bad" if text.startswith(("divergence", "differ")) or "(LD" in text
                else "ok" if text.startswith(("parity", "agree")) else "")

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr><th>" + html.escape(r[0]) + "</th>" + "".join(
        f'<td class="{css(t)}">{html.escape(t)}</td>' for t in r[1:]) + "</tr>" for r in rows)
    title = html.escape(f"llmdiff matrix {model} --impl {impl}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>"
            "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #999;padding:4px 8px;"
            "text-align:left}.ok{background:#dfd}.bad{background:#fdd}.error{background:#eee;color:#700}"
            f"</style></head><body><h1>{title}</h1><table><tr>{head}</tr>{body}</table></body></html>\n")
