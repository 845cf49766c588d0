"""Block-streamed and whole-model runs give identical captures; so do weights made on the
device, weights read from the canonical file and (the oracle) weights read from the HF
checkpoint's own files. CPU, tiny models."""

import numpy as np
import pytest

from llmdiff import inputs, safetensors_file, weights
from llmdiff.job import Job, Options, RunId, RunRequest, WeightsSource
from llmdiff.runner import Implementation, run_worker
from llmdiff.spec import get_spec

pytest.importorskip("torch")
pytest.importorskip("jax")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("stream")
    spec = get_spec("gemma-2-2b", tiny=True)  # local and global layers, four norms, softcaps
    canon = weights.random_weights(spec)
    weights.save_canonical(work / "canonical.safetensors", canon)
    hf_dir = weights.write_hf_checkpoint(work / "hf", spec, canon)
    return spec, work, WeightsSource(canonical=str(work / "canonical.safetensors"), hf_dir=str(hf_dir))


def _job(spec, source, capture="full"):
    return Job(spec=spec.to_dict(), tokens=inputs.synthetic_prompts(spec, 0, (20, 150)), weights=source,
               options=Options(device="cpu"), capture=capture)


def _run(impl, job, work, runs):
    requests = [RunRequest(RunId(d), str(work / f"{impl}-{label}-{d}"), job.options.with_(stream=s))
                for label, d, s in runs]
    out = {}
    for (label, d, _), r in zip(runs, run_worker(Implementation.parse(impl), job, requests, work)):
        assert r.ok, r.error
        out[label, d] = {k: np.asarray(v) for k, v in safetensors_file.load(r.captures_path).items()}
    return out


_WHOLE: dict = {}  # float32 whole-model captures, reused by the sketch test


@pytest.mark.parametrize("impl", ["hf", "oracle"])
def test_streamed_and_made_weights_give_identical_captures(setup, impl):
    spec, work, files = setup
    runs = [("whole", "float32", False), ("stream", "float32", True),
            ("whole", "bfloat16", False), ("stream", "bfloat16", True)]
    got = _run(impl, _job(spec, files), work, runs)
    made = _run(impl, _job(spec, WeightsSource(hf_dir=files.hf_dir, seed=0)), work,
                [("made", "float32", False), ("made-stream", "bfloat16", True)])
    got.update(made)
    if impl == "oracle":  # read from the HF directory's own files, tensor by tensor (`compare DIR`)
        got.update(_run(impl, _job(spec, WeightsSource(hf_dir=files.hf_dir, from_hf=True)), work,
                        [("from-hf", "float32", False), ("from-hf-stream", "bfloat16", True)]))
    _WHOLE[impl] = got["whole", "float32"]
    for (label, d), caps in got.items():
        whole = got["whole", d]
        assert sorted(caps) == sorted(whole) and len(whole) == 31
        differ = [k for k in whole if not np.array_equal(whole[k], caps[k])]
        assert not differ, f"{impl} {label} {d}: {differ[:3]}"


def test_sketched_captures_agree_across_implementations(setup):
    """hf and the oracle sketch with the same projection: each point's sketch is the host's
    sketch of its whole capture (both sketch points in groups of one width: `hf._Batched`, the
    oracle's `_Reduce`), the sketched distance estimates the exact one point by point, and
    top-1/top-k agreement is exact."""
    from llmdiff import diff

    spec, work, files = setup
    caps = {}
    for impl in ("hf", "oracle"):
        whole = _WHOLE.get(impl) or _run(impl, _job(spec, files), work, [("whole", "float32", False)])["whole", "float32"]
        caps[impl, "full"] = diff.sketch.load(whole)
        r, = run_worker(Implementation.parse(impl), _job(spec, files, "sketch"), [
            RunRequest(RunId("float32"), str(work / f"{impl}-sketch"))], work)
        assert r.ok, r.error
        caps[impl, "sketch"] = diff.load_captures(r.captures_path)
        differ = [n for n, want in caps[impl, "full"].items() if isinstance(want, diff.sketch.Sketch)
                  and not np.allclose(caps[impl, "sketch"][n].data, want.data, rtol=1e-12, atol=1e-12)]
        assert differ == [] and set(caps[impl, "full"]) <= set(caps[impl, "sketch"]), (impl, differ[:3])
    for name in ("embed", "L0.q", "L1.mlp_act", "final_norm", "logits"):
        exact = diff.point_metrics(caps["hf", "full"][name], caps["oracle", "full"][name])["rel_l2"]
        est = diff.point_metrics(caps["hf", "sketch"][name], caps["oracle", "sketch"][name])["rel_l2"]
        assert est == pytest.approx(exact, rel=0.3, abs=1e-12), name
    top = diff.sketch.top_metrics(caps["hf", "sketch"], caps["oracle", "sketch"], 5)
    full = diff.logits_metrics(caps["hf", "full"]["logits"], caps["oracle", "full"]["logits"])
    assert top["top1_agreement"] == full["top1_agreement"] and top["topk_overlap"] == full["topk_overlap"]


def test_gpu_streamed_compare_or_skip():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no GPU: the GPU paths run in bench/gpu_compare.py on a device")
    import llmdiff

    result = llmdiff.compare("gemma-2-2b", tiny=True, device="cuda", generate=True, stream=True, capture="sketch")
    assert result, result.summary()


def test_layers_placed_over_two_devices_give_one_device_captures(setup, monkeypatch):
    """`--devices 2` for the oracle: whole layers to a device, each step where its weights are.
    Two host devices stand in for two GPUs."""
    spec, work, files = setup
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    job = _job(spec, files)
    one = _run("oracle", job, work, [("one", "float32", False)])["one", "float32"]
    two_devices = job.options.with_(devices=2)
    r, = run_worker(Implementation.parse("oracle"), job, [RunRequest(RunId("float32"), str(work / "two"), two_devices)],
                    work)
    assert r.ok, r.error
    assert r.meta["details"]["devices"] == 2  # (host devices report no memory; GPUs do, per device)
    two = {k: np.asarray(v) for k, v in safetensors_file.load(r.captures_path).items()}
    assert [k for k in one if not np.array_equal(one[k], two[k])] == []
    three = job.options.with_(devices=3)
    r, = run_worker(Implementation.parse("oracle"), job, [RunRequest(RunId("float32"), str(work / "three"), three)], work)
    assert not r.ok and "--devices 3: jax sees 2 cpu device(s)" in r.error


@pytest.mark.parametrize("impl", ["hf", "oracle"])
def test_bench_times_a_bare_and_a_capturing_forward(setup, impl):
    spec, work, source = setup
    job = _job(spec, source, "sketch").with_(tokens=inputs.synthetic_prompts(spec, 0, (20,)))
    request = RunRequest(RunId("float32"), str(work / f"{impl}-bench"), job.options.with_(bench=True))
    result, = run_worker(Implementation.parse(impl), job, [request], work)
    assert result.ok, result.error
    timings = result.meta["timings"]
    assert 0 < timings["bare_forward_s"] < 60 and 0 < timings["capture_forward_s"] < 60


@pytest.mark.parametrize("impl", ["hf", "oracle"])
@pytest.mark.parametrize("source", ["file", "made"])
def test_two_gpus_give_one_gpu_captures_or_skip(setup, impl, source):
    """`--devices 2` on two GPUs: hf through accelerate's device map, the oracle by whole layers;
    every capture bit-identical to one GPU's, weights from a file and made on the devices."""
    torch = pytest.importorskip("torch")
    if torch.cuda.device_count() < 2:
        pytest.skip("fewer than two GPUs: the multi-GPU paths run on a device with two")
    spec, work, files = setup
    weights_source = files if source == "file" else WeightsSource(hf_dir=files.hf_dir, seed=0)
    job = _job(spec, weights_source).with_(options=Options(device="cuda", stream=False))
    runs = []
    for count in (1, 2):
        r, = run_worker(Implementation.parse(impl), job,
                        [RunRequest(RunId("float32"), str(work / f"{impl}-{source}-gpus{count}"),
                                    job.options.with_(devices=count))], work)
        assert r.ok, r.error
        runs.append(r)
    one, two = ({k: np.asarray(v) for k, v in safetensors_file.load(r.captures_path).items()} for r in runs)
    assert sorted(one) == sorted(two)
    assert [k for k in one if not np.array_equal(one[k], two[k])] == []
    peaks = runs[1].meta["peak_device_bytes"]
    assert isinstance(peaks, dict) and len(peaks) == 2 and all(v > 0 for v in peaks.values())


@pytest.mark.parametrize("subnormal", [False, True])
def test_runs_cast_from_a_kept_float32_model_give_a_fresh_loads_captures(setup, tmp_path, mutants_on_path, subnormal):
    """The oracle on a device of known memory keeps its float32 run's weights for the worker's
    next runs: a bfloat16 run and a streamed float64 one cast them on the device, bit for bit
    the weights a fresh load reads from the checkpoint; never when a weight is subnormal (XLA:CPU
    flushes those to zero when it casts)."""
    spec, work, files = setup
    hf_dir = files.hf_dir
    if subnormal:
        canon = weights.random_weights(spec)
        canon["L1.up"][3, 5] = np.float32(2.0 ** -130)   # a bfloat16 subnormal
        hf_dir = str(weights.write_hf_checkpoint(tmp_path / "hf", spec, canon))
    job = _job(spec, WeightsSource(hf_dir=hf_dir, from_hf=True))
    runs = [("whole", "float32", False), ("whole", "bfloat16", False), ("stream", "float64", True)]
    requests = lambda name: [RunRequest(RunId(d), str(tmp_path / f"{name}-{d}"), job.options.with_(stream=s))
                             for _, d, s in runs]
    kept = Implementation(name="kept", module="oracle_on_a_device", cls="OracleWithKnownMemory")
    results = {name: run_worker(impl, job, requests(name), tmp_path)
               for name, impl in (("kept", kept), ("fresh", Implementation.parse("oracle")))}
    for (_, d, _), got, want in zip(runs, results["kept"], results["fresh"]):
        assert got.ok and want.ok, (got.error, want.error)
        reused = got.meta["details"]["weights_from"] == "float32 run"
        assert reused == (d != "float32" and not subnormal), d
        a, b = (safetensors_file.load(r.captures_path) for r in (got, want))
        assert sorted(a) == sorted(b)
        differ = [k for k in a if not np.array_equal(np.asarray(a[k]), np.asarray(b[k]))]
        assert not differ, f"{d}: {differ[:3]}"
