"""The worker, in-process, with a fake adapter: what it writes for each run, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llmdiff import safetensors_file, worker
from llmdiff.job import Job, Options, RunId, RunRequest, WeightsSource
from llmdiff.spec import get_spec

SPEC = get_spec("gemma-7b", tiny=True)
HERE = Path(__file__).parent  # the fake adapters below are module test_worker


def _write_job(tmp_path, cls, runs):
    job = Job(spec=SPEC.to_dict(), tokens=[[2, 5], [2, 7, 8]], weights=WeightsSource(canonical="unused"),
              impl="fake", module="test_worker", cls=cls, runs=tuple(runs))
    path = tmp_path / "job.json"
    path.write_text(job.to_json())
    return str(path)


def test_each_run_writes_captures_and_metadata(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    runs = [RunRequest(RunId("float32"), str(tmp_path / "a")),
            RunRequest(RunId("float64", "bfloat16"), str(tmp_path / "b"), Options(precision={"gelu": "exact"}))]
    assert worker.main(_write_job(tmp_path, "Fake", runs)) == 0
    meta = json.loads((tmp_path / "a.json").read_text())
    assert meta["ok"] and meta["versions"] == {"fake": "1"} and meta["details"] == {"loads": ["float32"]}
    caps = safetensors_file.load(tmp_path / "a.safetensors")
    assert caps["embed"].shape == (1, 5, 3)  # prompts concatenated along the sequence
    meta = json.loads((tmp_path / "b.json").read_text())
    assert meta["details"] == {"loads": ["float32", "float64 as bfloat16 round_to=bfloat16 gelu=exact"]}


def test_a_failing_run_is_reported_and_the_next_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    runs = [RunRequest(RunId("bfloat16"), str(tmp_path / "a")), RunRequest(RunId("float32"), str(tmp_path / "b"))]
    assert worker.main(_write_job(tmp_path, "FailsInBfloat16", runs)) == 1
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert not a["ok"] and a["error"] == "ValueError: no bfloat16 here" and b["ok"]


def test_an_adapter_that_cannot_start_fails_every_run_with_one_line(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    runs = [RunRequest(RunId("float32"), str(tmp_path / "a")), RunRequest(RunId("bfloat16"), str(tmp_path / "b"))]
    assert worker.main(_write_job(tmp_path, "NotInstalled", runs)) == 1
    for n in "ab":
        meta = json.loads((tmp_path / f"{n}.json").read_text())
        assert meta["error"] == "implementation 'fake' needs the fake extra: pip install fake"


# --- the fake adapters (module test_worker, found on sys.path) -------------------------------

from llmdiff.references.base import MissingExtra, Reference  # noqa: E402


class Fake(Reference):
    dtypes = ("float32", "bfloat16", "float64")

    def versions(self):
        return {"fake": "1"}

    def load(self, request):
        self.__dict__.setdefault("loads", []).append(
            str(request.id) + (f" round_to={self.round_to} gelu={self.options.precision['gelu']}"
                               if request.options.precision else ""))

    def run(self, tokens):
        return {"embed": np.ones((1, len(tokens), 3), np.float32)}

    def describe(self):
        return {"loads": list(self.loads)}


class FailsInBfloat16(Fake):
    def load(self, request):
        if request.dtype == "bfloat16":
            raise ValueError("no bfloat16 here")
        super().load(request)


class NotInstalled(Fake):
    def __init__(self, job):
        raise MissingExtra("implementation 'fake' needs the fake extra: pip install fake")


def test_each_run_says_the_workers_host_memory(tmp_path, monkeypatch):
    """Resident MB after the load and the peak so far (a running maximum over the worker's runs):
    which worker held the host memory, from the report alone."""
    import sys

    monkeypatch.syspath_prepend(str(HERE))
    runs = [RunRequest(RunId("float32"), str(tmp_path / "a")), RunRequest(RunId("bfloat16"), str(tmp_path / "b"))]
    assert worker.main(_write_job(tmp_path, "Fake", runs)) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["timings"] for n in "ab")
    if sys.platform.startswith("linux"):
        assert 0 < a["rss_after_load_mb"] <= a["peak_rss_after_load_mb"] <= a["peak_rss_mb"] <= b["peak_rss_mb"]
        assert a["peak_rss_mb"] < 1 << 20   # MB, not bytes or KB
