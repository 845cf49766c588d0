"""Implementations by name, interpreter and virtualenv; a worker's failures, said once."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

from llmdiff.errors import UsageError
from llmdiff.runner import Implementation, venv_python


def test_registered_names_and_adapters():
    hf = Implementation.parse("hf")
    assert (hf.module, hf.cls) == ("llmdiff.references.hf", "HFReference")
    assert hf.adapter_class().makes_weights and hf.adapter_class().has_bare_forward
    mine = Implementation.parse(f"pkg.mod:Adapter@{sys.executable}")
    assert (mine.name, mine.module, mine.cls, mine.python) == ("pkg.mod:Adapter", "pkg.mod", "Adapter", sys.executable)


def test_unknown_name_and_bad_interpreter_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no implementation 'nope'; available: .*deepmind, hf, keras, llamacpp, oracle"):
        Implementation.parse("nope")
    with pytest.raises(UsageError, match="is not an executable Python interpreter"):
        Implementation.parse(f"hf@{tmp_path / 'python'}")


def test_an_implementation_with_its_own_virtualenv_runs_there(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMDIFF_VENVS", str(tmp_path))
    assert venv_python("hf") is None and Implementation.parse("hf").python == sys.executable
    exe = tmp_path / "hf" / "bin" / "python"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    os.chmod(exe, 0o755)
    assert venv_python("hf") == str(exe) and Implementation.parse("hf").python == str(exe)


def test_an_adapter_this_interpreter_cannot_import_is_taken_not_to_make_weights():
    from llmdiff.api import _makes_weights

    assert _makes_weights(Implementation.parse("oracle"))
    assert not _makes_weights(Implementation(name="elsewhere:Adapter", module="no_such_module_here", cls="Adapter"))


def test_workers_run_at_once_each_with_its_own_timeout(tmp_path, mutants_on_path, monkeypatch):
    """Started together, two workers that never finish are each killed at their timeout: the
    pair takes one timeout, not two, each says its own error, and the child one of them started
    goes too."""
    import time

    from llmdiff import inputs
    from llmdiff.job import Job, RunId, RunRequest, WeightsSource
    from llmdiff.runner import run_workers
    from llmdiff.spec import get_spec

    spec = get_spec("gemma-7b", tiny=True)
    job = Job(spec=spec.to_dict(), tokens=inputs.synthetic_prompts(spec), weights=WeightsSource(hf_dir=str(tmp_path), seed=0))
    names = ["hf_mutants:Hangs", "hf_mutants:SpawnsChildThenHangs"]
    monkeypatch.setenv("LLMDIFF_TEST_CHILD_PID", str(tmp_path / "child.pid"))
    workers = [(Implementation.parse(n), [RunRequest(RunId("float32"), str(tmp_path / f"w{i}"))], n)
               for i, n in enumerate(names)]
    got, t = [], time.perf_counter()
    run_workers(job, workers, tmp_path, got.extend, timeout=8)
    took = time.perf_counter() - t
    assert [(r.impl, r.ok, r.error) for r in got] == [(n, False, f"worker for {n!r} timed out after 8 s") for n in names]
    assert 8 <= took < 14, took   # one after another: 16 s at least
    stat = Path(f"/proc/{int((tmp_path / 'child.pid').read_text())}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z"   # gone, or a zombie left to init


H200 = [(143771 << 20, 143000 << 20)]


@pytest.mark.parametrize("model,device,gpus,host_gb,expected", [
    # gemma-7b on an H200: hf's and the oracle's float32 weights (34 GB each) and the oracle's
    # bfloat16 runs in a worker of their own (17 GB)
    ("gemma-7b", "cuda", H200, 100, ["hf", "oracle", "oracle-16bit"]),
    ("gemma-7b", "cuda", [(143771 << 20, 120000 << 20)], 100, ["hf", "oracle"]),   # no room for the third
    ("gemma-7b", "cuda", [(143771 << 20, 60000 << 20)], 100, None),  # most of the GPU already taken
    ("gemma-2-27b", "cuda", H200, 100, None),                       # 108 GB: more than half of it alone
    ("gemma-7b", "cpu", H200, 24, None),                            # the host's memory, whatever the GPU
    ("gemma-7b-tiny", "auto", [], 24, ["hf", "oracle"]),            # no GPU: the oracle's dtypes stay together
    ("gemma-7b-tiny", "cuda", [], 24, None),                        # a GPU whose memory cannot be read
])
def test_workers_run_at_once_when_what_they_hold_together_fits(monkeypatch, model, device, gpus, host_gb, expected):
    from llmdiff import api
    from llmdiff.job import Job, Options, WeightsSource
    from llmdiff.spec import get_spec

    monkeypatch.delenv("LLMDIFF_WORKERS_AT_ONCE", raising=False)
    monkeypatch.setattr(api, "_gpu_memory", lambda: gpus)
    monkeypatch.setattr(api, "_host_available", lambda: host_gb << 30)
    spec = get_spec(model.removesuffix("-tiny"), tiny=model.endswith("-tiny"))
    job = Job(spec=spec.to_dict(), tokens=[[2]], weights=WeightsSource(seed=0), options=Options(device=device))
    plan = api.Plan(spec, ["float32", "bfloat16"], [Implementation.parse("hf"), Implementation.parse("oracle")],
                    "oracle", None, None, [], job, Path("/w"), True, None, {}, {}, None, "eager")
    workers, at_once = api._workers(plan)
    assert ([label for _, _, label in workers] if at_once else None) == expected
    runs = sorted((i.name, str(r.id)) for i, requests, _ in workers for r in requests)
    assert runs == sorted((i.name, str(r.id)) for i in plan.chosen for r in plan.requests(i))   # every run, once
    if expected and "oracle-16bit" in expected:
        assert [str(r.id) for r in workers[2][1]] == ["bfloat16"]
    bench = dataclasses.replace(plan, job=job.with_(options=Options(device=device, bench=True)))
    assert api._workers(bench)[1] is False   # each worker times its own forwards
    monkeypatch.setenv("LLMDIFF_WORKERS_AT_ONCE", "0")
    assert api._workers(plan)[1] is False
    monkeypatch.setenv("LLMDIFF_WORKERS_AT_ONCE", "true")
    with pytest.raises(UsageError, match="LLMDIFF_WORKERS_AT_ONCE='true': 0 .* or 1"):
        api._workers(plan)


def test_gpu_memory_puts_the_visible_gpus_first(monkeypatch):
    import subprocess

    from llmdiff import api

    smi = subprocess.CompletedProcess([], 0, stdout="80000, 100\n143771, 143000\n", stderr="")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: smi)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert api._gpu_memory() == [(143771 << 20, 143000 << 20), (80000 << 20, 100 << 20)]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert api._gpu_memory()[0] == (80000 << 20, 100 << 20)


@pytest.mark.slow   # two compares
def test_the_oracle_split_over_two_workers_at_once_gives_the_same_report(llmdiff_cli, monkeypatch):
    """What a GPU gets (the oracle's bfloat16 runs in a worker of their own, every worker at
    once), forced here on the CPU: every point's numbers are those of one worker after another."""
    from llmdiff import api

    args = ("compare", "gemma-7b", "--tiny", "--no-diagnose", "--no-tokenizer-parity")
    monkeypatch.setenv("LLMDIFF_WORKERS_AT_ONCE", "0")
    code, _, _, one_by_one = llmdiff_cli(*args)
    monkeypatch.setenv("LLMDIFF_WORKERS_AT_ONCE", "1")
    monkeypatch.setattr(api, "_gpu_memory", lambda: H200)
    code2, out, _, at_once = llmdiff_cli(*args)
    assert code == code2 == 0, out
    assert "running hf, oracle, oracle-16bit at once" in out
    numbers = lambda r: [(run["candidate"], run["dtype"], [(p["name"], p.get("rel_l2"), p.get("noise_floor"))   # noqa: E731
                                                           for p in run["points"]]) for run in r["runs"]]
    assert numbers(at_once) == numbers(one_by_one) and len(numbers(at_once)) == 2


def test_a_serving_worker_runs_batch_after_batch_in_one_process(tmp_path):
    """The oracle lab's worker: the first batch with the job, more sent on its input, each
    collected once the worker says it is done; closed, it exits."""
    from llmdiff import inputs, weights
    from llmdiff.job import Job, RunId, RunRequest, WeightsSource
    from llmdiff.runner import Worker
    from llmdiff.spec import get_spec

    spec = get_spec("gemma-7b", tiny=True)
    canonical = tmp_path / "w.safetensors"
    weights.save_canonical(canonical, weights.random_weights(spec, 0))
    job = Job(spec=spec.to_dict(), tokens=inputs.synthetic_prompts(spec), weights=WeightsSource(canonical=str(canonical)))
    said = []
    w = Worker(Implementation.parse("oracle"), job, [RunRequest(RunId("float32"), str(tmp_path / "a"))], tmp_path,
               said.append, label="oracle-lab", serve=True)
    first = w.batch(60)
    pid = w.proc.pid
    w.send([RunRequest(RunId("bfloat16"), str(tmp_path / "b")), RunRequest(RunId("float64", "bfloat16"), str(tmp_path / "c"))])
    second = w.batch(60)
    assert [(str(r.id), r.ok) for r in first + second] == [("float32", True), ("bfloat16", True), ("float64 as bfloat16", True)]
    assert w.alive and w.proc.pid == pid and w.runs == 3
    assert sum("loaded in" in m for m in said) == 3 and not any("batch done" in m for m in said)
    w.close()
    assert not w.alive and w.proc.returncode == 0
    assert (tmp_path / "worker-oracle-lab.log").read_text().count("batch done") == 2


@pytest.mark.parametrize("adapter,error", [
    ("hf_mutants:Hangs", "worker for 'hf_mutants:Hangs' timed out after 4 s"),
    ("hf_mutants:ExitsEarly", "worker for 'hf_mutants:ExitsEarly' ended before finishing float32 and said nothing"),
])
def test_a_serving_worker_that_hangs_or_dies_says_so_and_is_gone(tmp_path, mutants_on_path, adapter, error):
    from llmdiff import inputs
    from llmdiff.job import Job, RunId, RunRequest, WeightsSource
    from llmdiff.runner import Worker
    from llmdiff.spec import get_spec

    spec = get_spec("gemma-7b", tiny=True)
    job = Job(spec=spec.to_dict(), tokens=inputs.synthetic_prompts(spec), weights=WeightsSource(hf_dir=str(tmp_path), seed=0))
    w = Worker(Implementation.parse(adapter), job, [RunRequest(RunId("float32"), str(tmp_path / "a"))], tmp_path, serve=True)
    (r,) = w.batch(4)
    assert (r.ok, r.error) == (False, error)
    assert not w.alive
    w.close()   # nothing left to end
