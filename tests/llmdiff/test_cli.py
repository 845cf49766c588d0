"""End to end: `llmdiff compare` on tiny models, correct and buggy, and every bad input."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_by_candidate
from llmdiff import convert, safetensors_file, weights
from llmdiff.spec import capture_points, get_spec

README = Path(__file__).parents[2] / "README.md"


def test_readme_main_command_exits_0_with_parity(tmp_path):
    """The README's set-up command ends with the main job; run that part exactly as written."""
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", README.read_text(), re.S).group(1)
    setup_line = block.strip().splitlines()[0]
    main_job = setup_line.split("&&")[-1].strip()
    assert main_job.startswith("llmdiff compare gemma-7b --tiny")
    proc = subprocess.run([*main_job.split(), "--json", str(tmp_path / "r.json")], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    spec = get_spec("gemma-7b", tiny=True)
    for dtype in ("float32", "bfloat16"):
        run = run_by_candidate(report, "hf", dtype)
        assert run["verdict"] == "parity"
        assert [p["name"] for p in run["points"]] == capture_points(spec)  # every point, both sides
        assert run["missing_points"] == []
    fp32_logits = next(p for p in run_by_candidate(report, "hf", "float32")["points"] if p["name"] == "logits")
    assert fp32_logits["rel_l2"] <= 1e-5
    assert "verdict: parity" in proc.stdout


def test_models_lists_published_numbers(llmdiff_cli):
    code, out, _, _ = llmdiff_cli("models")
    assert code == 0
    assert re.search(r"gemma-7b .*vocab 256000 .*hidden 3072 .*layers 28 .*heads 16/16 kv .*head_dim 256 .*mlp 24576", out)
    assert re.search(r"gemma-2b .*hidden 2048 .*layers 18 .*heads 8/1 kv .*head_dim 256 .*mlp 16384", out)


def test_second_interpreter_runs_the_worker_and_is_named_by_its_release(llmdiff_cli, tmp_path):
    """--impl hf@PYTHON: the worker runs under that interpreter, found by file path, and is
    labelled by the release it runs (`hf[transformers X]`); LABEL= names it. No report shows the
    interpreter's path as a name."""
    import transformers

    code, out, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--impl", f"hf@{sys.executable}",
                                       "--impl", f"old=hf@{sys.executable}", "--dtype", "float32", "--no-diagnose",
                                       "--out", str(tmp_path / "out"))
    assert code == 0, out
    names = [i["name"] for i in report["implementations"]]
    assert names == [f"hf[transformers {transformers.__version__}]", "old", "oracle"]
    assert all(i["ok"] and i["versions"]["transformers"] for i in report["implementations"][:2])
    assert report["implementations"][0]["python"] == sys.executable   # where it ran, as data
    assert {r["candidate"] for r in report["runs"]} == set(names[:2])
    written = [p for p in (tmp_path / "out").iterdir() if p.suffix in (".md", ".html", ".xml")]
    assert len(written) == 3
    shown = out + "".join(p.read_text() for p in written)
    assert sys.executable not in shown and "old" in shown


# --- bad input: one line, exit 2, nothing computed lost --------------------------------------

def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("llmdiff: error: ")
    return lines[0]


def test_unknown_model_suggests_close_names(llmdiff_cli):
    code, _, err, report = llmdiff_cli("compare", "gemma-7", "--tiny")
    assert code == 2
    assert "unknown model 'gemma-7'; did you mean gemma-7b" in _one_error_line(err)
    assert report["exit_code"] == 2 and "unknown model" in report["error"]


def test_unknown_implementation_lists_available(llmdiff_cli):
    code, _, err, _ = llmdiff_cli("compare", "gemma-7b", "--tiny", "--impl", "deepmnd")
    assert code == 2
    assert "no implementation 'deepmnd'; available: deepmind, hf, keras, llamacpp, oracle" in _one_error_line(err)


def test_missing_weights_path(llmdiff_cli, tmp_path):
    code, _, err, _ = llmdiff_cli("compare", "gemma-7b", "--tiny", "--weights", str(tmp_path / "nope"))
    assert code == 2
    assert "does not exist" in _one_error_line(err)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    spec = get_spec("gemma-7b", tiny=True)
    return weights.write_hf_checkpoint(tmp_path / "ckpt", spec, weights.random_weights(spec, seed=3))


def test_local_checkpoint_compares_at_parity(llmdiff_cli, tiny_checkpoint, tmp_path):
    """Read where it is: every worker reads the checkpoint's own files, no canonical copy."""
    work = tmp_path / "work"
    code, out, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--weights", str(tiny_checkpoint), "--no-diagnose",
                                       "--dtype", "float32", "--workdir", str(work))
    assert code == 0, out
    assert report["weights"]["source"] == "hf"
    spec = get_spec("gemma-7b", tiny=True)
    assert report["weights"]["fingerprint"] == weights.weights_fingerprint(weights.random_weights(spec, seed=3))
    assert not list(work.rglob("*.safetensors.tmp")) and not (work / "canonical.safetensors").exists()
    job = json.loads((work / "job-oracle.json").read_text())
    assert job["weights"] == {"canonical": None, "hf_dir": str(tiny_checkpoint), "seed": None, "from_hf": True}


def test_truncated_safetensors(llmdiff_cli, tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    code, _, err, _ = llmdiff_cli("compare", "gemma-7b", "--tiny", "--weights", str(tiny_checkpoint))
    assert code == 2
    assert "truncated" in _one_error_line(err)


def test_corrupt_safetensors_header(llmdiff_cli, tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\x00garbage"
    f.write_bytes(bytes(data))
    code, _, err, _ = llmdiff_cli("compare", "gemma-7b", "--tiny", "--weights", str(tiny_checkpoint))
    assert code == 2
    assert "corrupt safetensors header" in _one_error_line(err)


def test_shape_mismatch_names_the_tensor(llmdiff_cli, tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    tensors = {k: v.copy() for k, v in safetensors_file.load(f).items()}
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1]
    safetensors_file.save(f, tensors)
    code, _, err, _ = llmdiff_cli("compare", "gemma-7b", "--tiny", "--weights", str(tiny_checkpoint))
    assert code == 2
    line = _one_error_line(err)
    assert "shape mismatch: model.layers.1.mlp.up_proj.weight has shape (767, 96)" in line


def test_checkpoint_of_another_model(llmdiff_cli, tiny_checkpoint):
    code, _, err, _ = llmdiff_cli("compare", "gemma-2b", "--tiny", "--weights", str(tiny_checkpoint))
    assert code == 2
    assert "hidden_size=96 but gemma-2b has 384" in _one_error_line(err)


def test_pickle_only_checkpoint_is_refused_unread(llmdiff_cli, tmp_path):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    marker = tmp_path / "payload-ran"
    # A pickle whose loading would create `marker`: it must never be loaded.
    import pickle

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    code, _, err, _ = llmdiff_cli("compare", "gemma-7b", "--tiny", "--weights", str(ckpt))
    assert code == 2
    assert "never unpickles" in _one_error_line(err)
    assert not marker.exists()


def test_crashed_worker_keeps_other_results(llmdiff_cli, mutants_on_path):
    code, _, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--dtype", "float32",
                                       "--impl", "hf", "--impl", "hf_mutants:CrashesInRun", "--no-diagnose")
    assert code == 2
    assert "hf_mutants:CrashesInRun" in err and "exited with code 3" in err
    impls = {i["name"]: i for i in report["implementations"]}
    assert impls["hf"]["ok"] and impls["oracle"]["ok"] and not impls["hf_mutants:CrashesInRun"]["ok"]
    assert run_by_candidate(report, "hf", "float32")["verdict"] == "parity"  # not lost
    assert run_by_candidate(report, "hf_mutants:CrashesInRun", "float32")["verdict"] == "error"


def test_implementation_failing_to_load_is_one_line(llmdiff_cli, mutants_on_path):
    code, _, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--dtype", "float32",
                                       "--impl", "hf_mutants:FailsToLoad", "--no-diagnose")
    assert code == 2
    assert "RuntimeError: CUDA out of memory (simulated)" in _one_error_line(err)
    assert report["implementations"][1]["ok"]  # the oracle still ran


def test_nan_is_a_divergence_where_it_starts(llmdiff_cli, mutants_on_path):
    code, _, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--dtype", "float32",
                                     "--impl", "hf_mutants:NaNLogits")
    assert code == 1
    run = run_by_candidate(report, "hf_mutants:NaNLogits", "float32")
    assert run["first_divergence"] == "L1.out"


def test_device_cuda_without_a_gpu_is_a_clear_error(llmdiff_cli):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the CUDA path runs for real (bench/RESULTS.md has a device run)")
    code, _, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--device", "cuda", "--dtype", "float32",
                                       "--no-diagnose")
    assert code == 2
    assert "--device cuda: torch sees no GPU here" in err and "--device cuda: jax sees no GPU here" in err
    assert all(not i["ok"] for i in report["implementations"])


def test_sketched_streamed_compare_of_synthetic_prompts(llmdiff_cli):
    """What a full-size GPU run does (sketches, block streaming, --tokens), on a tiny model."""
    code, out, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--dtype", "float32", "--tokens", "40,9",
                                       "--capture", "sketch", "--stream")
    assert code == 0, out
    assert report["tokens"]["lengths"] == [40, 9] and report["tokens"]["source"] == "synthetic"
    assert report["options"]["capture"] == "sketch" and report["options"]["stream"] is True
    assert all(i["details"]["streamed"] for i in report["implementations"])
    run = report["runs"][0]
    assert run["logits"]["kl_mean"] is None and run["logits"]["top1_agreement"] == 1.0
    assert all(p["max_abs"] is None and p["estimated"] for p in run["points"])
    assert "estimated" in out


@pytest.mark.parametrize("bad", ["abc", "512,1"])
def test_bad_prompt_lengths_are_one_line_errors(llmdiff_cli, bad):
    code, _, err, _ = llmdiff_cli("compare", "gemma-7b", "--tiny", "--tokens", bad)
    assert code == 2 and err.count("\n") == 1 and "--tokens" in err



def test_a_hung_worker_is_killed_at_its_timeout_and_its_progress_kept(tmp_path, mutants_on_path):
    from llmdiff import inputs
    from llmdiff.job import Job, RunId, RunRequest, WeightsSource
    from llmdiff.runner import Implementation, run_worker
    from llmdiff.spec import get_spec

    spec = get_spec("gemma-7b", tiny=True)
    job = Job(spec=spec.to_dict(), tokens=inputs.synthetic_prompts(spec), weights=WeightsSource(hf_dir=str(tmp_path), seed=0))
    said = []
    r, = run_worker(Implementation.parse("hf_mutants:Hangs"), job, [RunRequest(RunId("float32"), str(tmp_path / "h"))],
                    tmp_path, timeout=4, progress=said.append)
    assert not r.ok and r.error == "worker for 'hf_mutants:Hangs' timed out after 4 s"
    assert said == ["hf_mutants:Hangs float32: loading"]
    assert "llmdiff-worker: hf_mutants:Hangs float32: loading" in (tmp_path / "worker-hf_mutants_Hangs.log").read_text()


def test_sigterm_ends_a_command_without_interrupt_handling_with_143(tmp_path):
    """Only compare, selftest, matrix and bisect turn SIGTERM into Ctrl-C (and say what finished);
    `report` keeps the default, exit 143, not click's 'Aborted!' with exit 1."""
    code = ("import os, signal, sys\n"
            "from llmdiff import api, cli\n"
            "api.recompare = lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM)\n"
            f"sys.argv = ['llmdiff', 'report', {str(tmp_path)!r}]\n"
            "cli.main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stdout, proc.stderr)
    assert "Aborted" not in proc.stdout + proc.stderr
