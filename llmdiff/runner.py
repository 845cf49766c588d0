"""Launch one worker process per implementation and collect what each wrote.

Workers run one after another (each gets the whole machine, or GPU), or at once when they fit
together (`run_workers`: `api` decides). A worker that crashes,
hangs or is killed loses only its own unfinished runs: everything else is kept and the error
is reported per run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

from llmdiff.errors import UsageError
from llmdiff.job import Job, RunId, RunRequest

ENTRY_POINT_GROUP = "llmdiff.references"


def cache_dir(*parts: str) -> str:
    """llmdiff's cache: $XDG_CACHE_HOME/llmdiff/PARTS, else ~/.cache/llmdiff/PARTS (venvs, wheels,
    compiled JAX steps)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "llmdiff", *parts)


def venvs_root() -> str:
    """Where implementations with a virtualenv of their own live: $LLMDIFF_VENVS/NAME."""
    return os.environ.get("LLMDIFF_VENVS") or cache_dir("venvs")


def venv_python(name: str) -> str | None:
    """The interpreter of implementation NAME's own virtualenv, if it has one (e.g. deepmind)."""
    exe = os.path.join(venvs_root(), name, *(("Scripts", "python.exe") if os.name == "nt" else ("bin", "python")))
    return exe if os.path.isfile(exe) and os.access(exe, os.X_OK) else None


def available_implementations() -> dict[str, str]:
    """name -> "module:Class" for every implementation registered by entry point."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


_LABEL = re.compile(r"^[A-Za-z0-9][\w.+\-\[\] ]*$")


@dataclass(frozen=True)
class Implementation:
    name: str                    # its label in the reports: "hf", "old", "hf[transformers 4.38.1]", "module:Class"
    module: str
    cls: str
    python: str = sys.executable

    @classmethod
    def parse(cls, text: str) -> "Implementation":
        """`[LABEL=]NAME[@PYTHON]` or `[LABEL=]module:Class[@PYTHON]`. Without a label, one run
        under another interpreter is named by the release it runs (`hf[transformers 4.38.1]`),
        never by the interpreter's path."""
        label = None
        if "=" in text.partition("@")[0]:
            label, _, text = text.partition("=")
            if not _LABEL.match(label):
                raise UsageError(f"implementation label {label!r}: use letters, digits and . _ - + [ ] (old=hf@PYTHON)")
        name, _, python = text.partition("@")
        if python and not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise UsageError(f"implementation {text!r}: {python} is not an executable Python interpreter")
        if ":" in name:
            module, _, attr = name.partition(":")
            impl = cls(name=name, module=module, cls=attr, python=python or sys.executable)
        else:
            known = available_implementations()
            if name not in known:
                raise UsageError(f"no implementation {name!r}; available: {', '.join(sorted(known)) or 'none'}"
                                 " (or give an adapter as module:Class)")
            module, _, attr = known[name].partition(":")
            # Without @PYTHON: the implementation's own virtualenv where it has one, else this Python.
            impl = cls(name=name, module=module, cls=attr, python=python or venv_python(name) or sys.executable)
        if label is None and python and ":" not in name:
            label = impl.release_label(name)
        return replace(impl, name=label) if label else impl

    def release_label(self, name: str) -> str:
        """`name[package version]`: the release of the adapter's package under `python`."""
        try:
            package = getattr(self.adapter_class(), "package", "")
        except (ImportError, AttributeError):
            package = ""
        if not package:
            return f"{name}[{Path(self.python).parent.parent.name or 'python'}]"
        try:
            out = subprocess.run([self.python, "-c", "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))",
                                  package], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            version = out.stdout.strip() if out.returncode == 0 else ""
        except (OSError, subprocess.TimeoutExpired):
            version = ""
        return f"{name}[{package} {version or 'not installed'}]"

    def adapter_class(self):
        """The adapter class, imported here (to read what it declares, e.g. `makes_weights`)."""
        import importlib

        return getattr(importlib.import_module(self.module), self.cls)


@dataclass
class RunResult:
    impl: str
    id: RunId
    ok: bool
    error: str | None
    captures_path: str | None
    meta: dict = field(default_factory=dict)
    out: str | None = None       # the path prefix the worker was told to write to

    @property
    def dtype(self) -> str:
        return self.id.dtype


PROGRESS = "llmdiff-worker: "  # a worker's stderr lines that say how far it got


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith(PROGRESS)]
    return lines[-1].strip() if lines else ""


def _kill_group(proc) -> None:
    """End the worker and every process it started (it leads its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


BATCH_DONE = "batch done"   # a serving worker's line after each batch (worker.py)


class Worker:
    """One worker process for `requests`, started at once: its output goes to
    workdir/worker-LABEL.log (the implementation's name by default) as it comes, and its
    progress lines to `progress` (a callable taking a str; settable), if given; `wait`
    collects what it wrote. With `serve`, the worker stays up after them: `batch` waits for the
    runs asked so far, `send` asks for more, `close` ends it."""

    def __init__(self, impl: Implementation, job: Job, requests: list[RunRequest], workdir: Path, progress=None,
                 label: str | None = None, serve: bool = False):
        import threading

        import llmdiff.references

        self.impl, self.requests, self.proc, self.failure, self.waited = impl, list(requests), None, None, False
        self.progress, self.runs, self.serving = progress, len(requests), serve
        self._batches = threading.Semaphore(0)   # released at each BATCH_DONE line
        job = job.with_(impl=impl.name, module=impl.module, cls=impl.cls,
                        references_dir=list(llmdiff.references.__path__)[0], runs=tuple(requests))
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label or impl.name)
        job_path = workdir / f"job-{safe}.json"
        job_path.write_text(job.to_json())
        worker = Path(__file__).with_name("worker.py")
        env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
        # A foreign interpreter finds adapters given as module:Class on the caller's path.
        env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), env.get("PYTHONPATH", "")] if p)
        self.log_path = workdir / f"worker-{safe}.log"
        self.started = time.perf_counter()
        try:
            self.proc = subprocess.Popen([impl.python, str(worker), str(job_path), *(["--serve"] if serve else [])],
                                         stdin=subprocess.PIPE if serve else subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                         errors="replace", start_new_session=True)
        except OSError as e:
            self.failure = f"cannot start worker for {impl.name!r} with {impl.python}: {e.strerror}"
            return

        def copy():
            with open(self.log_path, "w") as log:
                for line in self.proc.stdout:
                    log.write(line)
                    log.flush()
                    if line.startswith(PROGRESS):
                        said = line[len(PROGRESS):].strip()
                        if said == BATCH_DONE:
                            self._batches.release()
                        elif self.progress:
                            self.progress(said)

        self.reader = threading.Thread(target=copy, name=f"llmdiff-worker-{impl.name}", daemon=True)
        self.reader.start()

    @property
    def alive(self) -> bool:
        return self.proc is not None and not self.waited and self.proc.poll() is None

    def kill(self) -> None:
        """End the worker's whole process group (it may have started processes of its own),
        unless `wait` has already done so."""
        if self.proc is not None and not self.waited:
            _kill_group(self.proc)

    def wait(self, timeout: float | None = None, cancel=None) -> list[RunResult]:
        """Wait until the worker exits, killing its whole process group `timeout` s after it
        started, when `cancel` (a threading.Event) is set, or when this process is interrupted;
        then end whatever it left running."""
        if self.proc is not None and not self.waited:
            self.failure = self._watch(timeout, cancel)
        return self._collect()

    def send(self, requests: list[RunRequest]) -> None:
        """A serving worker's next batch (its clock restarts for `batch`'s timeout)."""
        from dataclasses import asdict

        self.requests, self.started = list(requests), time.perf_counter()
        self.runs += len(requests)
        try:
            self.proc.stdin.write(json.dumps([asdict(r) for r in requests]) + "\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):   # it has died: `batch` says how
            pass

    def batch(self, timeout: float | None = None, cancel=None) -> list[RunResult]:
        """A serving worker's results for the batch asked last, once it says it is done; if it
        dies, or is still at it `timeout` s after the batch was sent, or this process is
        interrupted, the worker is ended and the runs it did not finish say so."""
        if self.proc is None:
            return self._collect()
        try:
            while not self._batches.acquire(timeout=0.2):
                if self.proc.poll() is not None:
                    self.reader.join(5)   # its last lines, a BATCH_DONE among them, are read
                    if self._batches.acquire(blocking=False):
                        break
                    self.failure = self._watch(None)
                    return self._collect()
                if timeout is not None and time.perf_counter() - self.started > timeout:
                    _kill_group(self.proc)
                    self._watch(None)
                    self.failure = f"worker for {self.impl.name!r} timed out after {timeout:.0f} s"
                    return self._collect()
                if cancel is not None and cancel.is_set():
                    self.failure = self._watch(0, cancel)
                    return self._collect()
        except BaseException:
            self.kill()
            raise
        return self._collect()

    def close(self, grace: float = 30.0) -> None:
        """End a serving worker: its input closed, then its whole group killed if it lingers."""
        if self.proc is None or self.waited:
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        self._watch(0)

    def _collect(self) -> list[RunResult]:
        stderr = self.log_path.read_text() if self.log_path.exists() else ""
        wall = time.perf_counter() - self.started
        results = []
        for r in self.requests:
            meta_path = Path(r.out + ".json")
            if meta_path.exists():
                meta = json.loads(meta_path.read_text())
                meta.setdefault("timings", {})["worker_wall_s"] = round(wall, 3)
                ok = bool(meta.get("ok"))
                results.append(RunResult(self.impl.name, r.id, ok, meta.get("error"),
                                         r.out + ".safetensors" if ok else None, meta, r.out))
            else:
                error = self.failure or (f"worker for {self.impl.name!r} ended before finishing {r.dtype}"
                                         + (f": {_tail(stderr)}" if _tail(stderr) else " and said nothing"))
                results.append(RunResult(self.impl.name, r.id, False, error, None, {"python": self.impl.python}, r.out))
        return results

    def _watch(self, timeout: float | None, cancel=None) -> str | None:
        proc, name = self.proc, self.impl.name
        timed_out = cancelled = False
        deadline = None if timeout is None else self.started + timeout
        try:
            while True:
                step = None if deadline is None else max(0.0, deadline - time.perf_counter())
                if cancel is not None:
                    step = 0.2 if step is None else min(step, 0.2)
                try:
                    proc.wait(step)
                    break
                except subprocess.TimeoutExpired:
                    if cancel is not None and cancel.is_set():
                        cancelled = True
                        break
                    if deadline is not None and time.perf_counter() >= deadline:
                        timed_out = True
                        break
        finally:  # a timeout, Ctrl-C or SIGTERM here: the worker's group goes too
            _kill_group(proc)
            proc.wait()
            self.waited = True
            self.reader.join(5)
            proc.stdout.close()
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        if cancelled:
            return f"worker for {name!r} was stopped: the run was called off"
        if timed_out:
            return f"worker for {name!r} timed out after {timeout:.0f} s"
        if proc.returncode < 0:
            return f"worker for {name!r} was killed by signal {-proc.returncode}" + (
                " (out of memory?)" if proc.returncode == -9 else "")
        if proc.returncode not in (0, 1):
            return f"worker for {name!r} exited with code {proc.returncode}: {_tail(self.log_path.read_text())}"
        return None


def run_worker(impl: Implementation, job: Job, requests: list[RunRequest], workdir: Path,
               timeout: float | None = None, progress=None) -> list[RunResult]:
    """Run one worker process for `requests` to its end (`Worker`)."""
    return Worker(impl, job, requests, workdir, progress).wait(timeout)


def run_workers(job: Job, workers: list, workdir: Path, done, timeout: float | None = None,
                progress=None, serve: str | None = None, cancel=None):
    """Several workers at once: `workers` of (impl, requests, label), all started before any is
    waited for; each is killed `timeout` s after its start. `done` (callable) is given each
    worker's results as they are collected; when this process is interrupted every worker is
    killed and what each finished is still given, then the interrupt goes on. The worker
    labelled `serve` stays up after its runs (`Worker.batch`): it is returned, if it is. Setting
    `cancel` (a threading.Event) stops them all."""
    started, kept = [], None
    try:
        for impl, requests, label in workers:
            started.append(Worker(impl, job, requests, workdir, progress, label, serve=label == serve))
        while started:
            w = started[0]
            done(w.batch(timeout, cancel) if w.serving else w.wait(timeout, cancel))
            kept = w if w.serving and w.alive else kept
            started.pop(0)
    finally:
        for w in started:   # interrupted: every run a worker wrote before it was killed is kept
            w.kill()
        for w in started:
            done(w.wait())
        if started and kept is not None:
            kept.close(0)   # killed and reaped, its pipes closed
    return kept
