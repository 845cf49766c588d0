"""Hostile and broken input to `compare`, `tokenize` and `report`: never run a checkpoint's code,
never unpickle, never lose a saved result, never hang, never blame an implementation for the
checkpoint. Each test asserts the exit code, the one line said, and what must not have happened."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_by_candidate
from llmdiff import safetensors_file, weights
from llmdiff.spec import get_spec

SPEC = get_spec("gemma-7b", tiny=True)
FAST = ("--dtype", "float32", "--no-diagnose", "--no-tokenizer-parity")


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("llmdiff: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


class Payload:
    """Unpickling this touches `marker`: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def ckpt(tmp_path):
    return weights.write_hf_checkpoint(tmp_path / "ckpt", SPEC, weights.random_weights(SPEC, seed=3))


def _remote_code_checkpoint(ckpt, marker):
    config = json.loads((ckpt / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                               "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (ckpt / "config.json").write_text(json.dumps(config))
    code = f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
    (ckpt / "modeling_evil.py").write_text(code)
    (ckpt / "configuration_evil.py").write_text(code)


# --- code execution and unpickling ---------------------------------------------------------

def test_remote_code_checkpoint_is_refused_and_never_run(llmdiff_cli, ckpt, tmp_path):
    marker = tmp_path / "remote-code-ran"
    _remote_code_checkpoint(ckpt, marker)
    code, _, err, _ = llmdiff_cli("compare", "gemma-7b", "--tiny", "--weights", str(ckpt), *FAST)
    assert code == 2
    line = _one_error_line(err)
    assert "config.json: model_type 'evil'" in line and "modeling_evil.py" in line and "never runs" in line
    assert not marker.exists()


def test_tokenize_refuses_remote_code_checkpoint(llmdiff_cli, ckpt, tmp_path):
    from llmdiff.tiny_tokenizer import train_tiny_sentencepiece, write_tokenizer_files

    write_tokenizer_files(ckpt, SPEC, sp_model=train_tiny_sentencepiece(SPEC.text_vocab_size))
    marker = tmp_path / "remote-code-ran"
    _remote_code_checkpoint(ckpt, marker)
    code, _, err, _ = llmdiff_cli("tokenize", "gemma-7b", "--tiny", "--weights", str(ckpt))
    assert code == 2
    assert "never runs" in _one_error_line(err)
    assert not marker.exists()


def test_hf_never_loads_remote_code_even_asked_through_its_own_loader(ckpt, tmp_path):
    """The worker's own call, on a checkpoint that needs remote code: an error, no prompt on
    stdin, no code run (transformers' trust_remote_code=False)."""
    marker = tmp_path / "remote-code-ran"
    _remote_code_checkpoint(ckpt, marker)
    script = ("import sys; from transformers import AutoModelForCausalLM\n"
              "try:\n    AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=False, use_safetensors=True)\n"
              "except Exception as e:\n    print('refused', type(e).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(ckpt)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert "refused" in proc.stdout, proc.stdout + proc.stderr
    assert not marker.exists()


def test_a_pickle_beside_an_oddly_named_safetensors_is_never_loaded(llmdiff_cli, ckpt, tmp_path):
    marker = tmp_path / "pickle-ran"
    (ckpt / "model.safetensors").rename(ckpt / "weights.safetensors")
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    code, _, err, _ = llmdiff_cli("compare", "gemma-7b", "--tiny", "--weights", str(ckpt), *FAST)
    assert code == 2
    line = _one_error_line(err)
    assert "no model.safetensors" in line and "weights.safetensors" in line
    assert not marker.exists()


def test_a_pickle_beside_model_safetensors_is_ignored_and_reported(llmdiff_cli, ckpt, tmp_path):
    marker = tmp_path / "pickle-ran"
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    code, out, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--weights", str(ckpt), *FAST)
    assert code == 0, out + err
    assert report["weights"]["ignored_pickles"] == ["pytorch_model.bin"]
    assert "not read: pytorch_model.bin" in out
    assert not marker.exists()


def test_a_stray_safetensors_file_is_read_by_no_one(llmdiff_cli, ckpt):
    """transformers reads model.safetensors only; llmdiff's reader must not let a stray file
    override a tensor (that made a false divergence blamed on hf)."""
    table = safetensors_file.load(ckpt / "model.safetensors")["model.embed_tokens.weight"]
    safetensors_file.save(ckpt / "extra.safetensors", {"model.embed_tokens.weight": np.asarray(table) * 2})
    code, out, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--weights", str(ckpt), *FAST)
    assert code == 0, out + err
    assert report["weights"]["files"] == ["model.safetensors"]
    assert report["weights"]["ignored_safetensors"] == ["extra.safetensors"]
    assert run_by_candidate(report, "hf", "float32")["verdict"] == "parity"
    # checked and fingerprinted beside the workers: the fingerprint of model.safetensors' weights
    assert report["weights"]["fingerprint"] == weights.weights_fingerprint(weights.random_weights(SPEC, seed=3))
    assert 0 < report["timings"]["check_s"] < report["timings"]["total_s"]   # what the pass took, beside them


# --- the checkpoint's own defects ----------------------------------------------------------

def test_nan_weights_are_named_as_the_checkpoints(llmdiff_cli, ckpt):
    f = ckpt / "model.safetensors"
    tensors = {k: np.array(v) for k, v in safetensors_file.load(f).items()}
    tensors["model.layers.0.mlp.down_proj.weight"].reshape(-1)[:3] = np.nan
    safetensors_file.save(f, tensors)
    code, _, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--weights", str(ckpt), *FAST)
    assert code == 2
    line = _one_error_line(err)
    assert "holds 3 NaN/Inf values" in line and "LD701" in line
    assert report == {"llmdiff_version": report["llmdiff_version"], "error": line[len("llmdiff: error: "):],
                      "exit_code": 2}


@pytest.mark.parametrize("content", [b"42", b"[1, 2]", b"\xff\xfe{}", b"{not json"])
def test_config_json_that_is_not_an_object(llmdiff_cli, ckpt, content):
    (ckpt / "config.json").write_bytes(content)
    code, _, err, _ = llmdiff_cli("compare", "gemma-7b", "--tiny", "--weights", str(ckpt), *FAST)
    assert code == 2
    assert "config.json" in _one_error_line(err)


def _cli(args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "llmdiff.cli", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, **kw)


def test_config_json_that_is_a_fifo_does_not_block(ckpt):
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")
    proc = _cli(["compare", "gemma-7b", "--tiny", "--weights", str(ckpt), *FAST], timeout=60)
    assert proc.returncode == 2
    assert "is a FIFO, not a regular file" in _one_error_line(proc.stderr)


# --- inputs checked before any model runs --------------------------------------------------

def _saved_report(tmp_path) -> Path:
    return tmp_path / "baseline.json"


@pytest.mark.parametrize("case", ["missing", "corrupt", "other-shape", "not-an-object"])
def test_bad_baseline_is_refused_before_the_run(llmdiff_cli, tmp_path, case):
    path = tmp_path / "baseline.json"
    if case == "corrupt":
        path.write_text('{"runs": [')
    elif case == "other-shape":
        path.write_text(json.dumps({"runs": [{"candidate": "hf", "dtype": "float32", "points": [{"rel": 1}]}]}))
    elif case == "not-an-object":
        path.write_text("[]")
    t = time.perf_counter()
    code, out, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", *FAST, "--baseline", str(path))
    assert code == 2
    assert "baseline" in _one_error_line(err)
    assert "running hf" not in out and time.perf_counter() - t < 10  # no worker started


def test_json_under_a_file_is_refused_before_the_run(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = _cli(["compare", "gemma-7b", "--tiny", *FAST, "--json", str(tmp_path / "afile" / "r.json")])
    assert proc.returncode == 2
    assert "is a file, not a directory" in _one_error_line(proc.stderr)
    assert "running hf" not in proc.stdout


def test_workdir_that_is_a_file(llmdiff_cli, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, _, err, _ = llmdiff_cli("compare", "gemma-7b", "--tiny", *FAST, "--workdir", str(tmp_path / "afile"))
    assert code == 2
    assert "--workdir" in _one_error_line(err)


@pytest.mark.parametrize("toml,said", [
    ("dtypes = []", "dtypes must be a non-empty list"),
    ("implementations = []", "implementations must be a non-empty list"),
    ("timeout = -1", "timeout must be a positive number"),
])
def test_config_that_would_compare_nothing(tmp_path, toml, said):
    (tmp_path / "llmdiff.toml").write_text(toml + "\n")
    proc = _cli(["compare", "gemma-7b", "--tiny", "--no-diagnose"], cwd=tmp_path)
    assert proc.returncode == 2
    assert said in _one_error_line(proc.stderr)


# --- saved results are never lost ----------------------------------------------------------

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    proc = _cli(["compare", "gemma-7b", "--tiny", *FAST, "--out", str(out), "--save-captures"], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_report_with_a_bad_threshold_keeps_the_saved_report(saved_run, llmdiff_cli):
    before = (saved_run / "report.json").read_bytes()
    code, _, err, _ = llmdiff_cli("report", str(saved_run), "--threshold", "L*.q", "--json",
                                  str(saved_run / "report.json"))
    assert code == 2
    line = _one_error_line(err)
    assert "--threshold 'L*.q'" in line and "left as it was" in line
    assert (saved_run / "report.json").read_bytes() == before
    code, out, _, _ = llmdiff_cli("report", str(saved_run))  # still re-renders
    assert code == 0 and "verdict: parity" in out


def test_report_on_a_corrupt_capture_file_keeps_the_other_runs(saved_run, tmp_path, llmdiff_cli):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(saved_run, copy)
    victim = copy / "captures" / "hf-float32.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    code, out, err, _ = llmdiff_cli("report", str(copy), "--json", str(tmp_path / "re.json"))
    assert code == 2
    assert "saved captures unreadable" in out and "Traceback" not in err
    report = json.loads((tmp_path / "re.json").read_text())
    assert run_by_candidate(report, "hf", "float32")["verdict"] == "error"


@pytest.mark.parametrize("content", [b"{", b"\xff", b"[]", b'{"results": [{"nope": 1}], "spec": 3}'])
def test_report_on_a_corrupt_report(saved_run, tmp_path, llmdiff_cli, content):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(saved_run, copy)
    (copy / "report.json").write_bytes(content)
    code, _, err, _ = llmdiff_cli("report", str(copy))
    assert code == 2
    assert "report" in _one_error_line(err)


# --- stages that cannot run are errors -----------------------------------------------------

def test_tokenizer_parity_that_cannot_run_is_an_error_with_the_skip(llmdiff_cli, ckpt):
    from llmdiff.tiny_tokenizer import train_tiny_sentencepiece, write_tokenizer_files

    write_tokenizer_files(ckpt, SPEC, sp_model=train_tiny_sentencepiece(SPEC.text_vocab_size))
    (ckpt / "tokenizer.json").write_text("{ this is not a tokenizer")
    code, out, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--weights", str(ckpt),
                                         "--dtype", "float32", "--no-diagnose")
    assert code == 2
    line = _one_error_line(err)
    assert line.startswith("llmdiff: error: tokenizer parity could not run:")
    assert line.endswith("skip it with --no-tokenizer-parity")
    assert report["exit_code"] == 2
    assert report["errors"][0]["stage"] == "tokenizer parity"
    assert run_by_candidate(report, "hf", "float32")["verdict"] == "parity"  # nothing lost
    code, _, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--weights", str(ckpt),
                                     "--dtype", "float32", "--no-diagnose", "--no-tokenizer-parity")
    assert code == 0 and "tokenizer" not in report


# --- workers: hangs, leaks, interrupts -----------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (reaped by init later).
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def _job(tmp_path):
    from llmdiff import inputs

    from llmdiff.job import Job, WeightsSource

    return Job(spec=SPEC.to_dict(), tokens=inputs.synthetic_prompts(SPEC), weights=WeightsSource(hf_dir=str(tmp_path), seed=0))


def test_a_worker_child_holding_the_pipe_is_killed_at_the_timeout(tmp_path, mutants_on_path, monkeypatch):
    from llmdiff.job import RunId, RunRequest
    from llmdiff.runner import Implementation, run_worker

    pid_file = tmp_path / "child.pid"
    monkeypatch.setenv("LLMDIFF_TEST_CHILD_PID", str(pid_file))
    t = time.perf_counter()
    r, = run_worker(Implementation.parse("hf_mutants:SpawnsChildThenHangs"), _job(tmp_path),
                    [RunRequest(RunId("float32"), str(tmp_path / "c"))], tmp_path, timeout=6)
    took = time.perf_counter() - t
    assert not r.ok and "timed out after 6 s" in r.error
    assert took < 20, took  # the child kept the pipe open for 104 s before
    child = int(pid_file.read_text())
    assert not _alive(child)


def test_a_worker_that_exits_early_says_so(tmp_path, mutants_on_path):
    from llmdiff.job import RunId, RunRequest
    from llmdiff.runner import Implementation, run_worker

    r, = run_worker(Implementation.parse("hf_mutants:ExitsEarly"), _job(tmp_path),
                    [RunRequest(RunId("float32"), str(tmp_path / "e"))], tmp_path)
    assert r.error == "worker for 'hf_mutants:ExitsEarly' ended before finishing float32 and said nothing"


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_keeps_finished_runs_and_leaves_nothing_behind(tmp_path, sig, code):
    """Ctrl-C (or SIGTERM) once hf has finished, while a second worker (started with it) is still loading (one
    that never finishes: the signal cannot come too late): the report keeps hf's runs, says it
    is incomplete, the exit code is 128+signal, no worker and no temporary directory is left."""
    from conftest import MUTANTS_DIR

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(MUTANTS_DIR), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "llmdiff.cli", "compare", "gemma-7b", "--tiny", *FAST,
                             "--impl", "hf", "--impl", "hf_mutants:Hangs", "--json", str(tmp_path / "r.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            stdin=subprocess.DEVNULL)
    seen = []   # the two workers run at once: hf's run done, and the other one loading
    for line in proc.stdout:
        seen.append(line)
        if any("hf float32: loaded in" in s for s in seen) and any("hf_mutants:Hangs float32: loading" in s for s in seen):
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, "".join(seen) + out + err
    assert "Traceback" not in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["incomplete"] and report["exit_code"] == 130
    assert {i["name"]: i["ok"] for i in report["implementations"]}["hf"] is True
    # The temporary work directory is gone (the tiny tokenizer's cache stays: it is a cache).
    assert [p.name for p in tmp.glob("llmdiff-*") if p.name != "llmdiff-tokenizers"] == []
    left = subprocess.run(["pgrep", "-f", str(tmp)], capture_output=True, text=True).stdout.split()
    assert left == []  # no worker of this run is left


def test_a_checkpoint_the_check_refuses_stops_the_workers_started_beside_it(ckpt, tmp_path, llmdiff_cli,
                                                                              mutants_on_path):
    """A checkpoint's check (NaN/Inf, fingerprint) runs beside the workers: the NaN it finds is
    the run's one error, and it stops them (one that would never finish too), not the timeout."""
    f = ckpt / "model.safetensors"
    tensors = {k: np.array(v) for k, v in safetensors_file.load(f).items()}
    tensors["model.embed_tokens.weight"][7, 7] = np.nan
    safetensors_file.save(f, tensors)
    t = time.perf_counter()
    code, out, err, _ = llmdiff_cli("compare", str(ckpt), *FAST, "--impl", "hf_mutants:Hangs", "--timeout", "300",
                                    "--workdir", str(tmp_path / "w"))
    assert code == 2, out + err
    assert "tensor embed holds 1 NaN/Inf values" in _one_error_line(err)
    assert time.perf_counter() - t < 60
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "w")], capture_output=True, text=True).stdout.split()
    assert left == []   # no worker of this run is left
