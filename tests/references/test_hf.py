"""HF transformers against the oracle on every Gemma 2/3 model, and HF mutants of real bugs.

Calls the Python API (`llmdiff compare MODEL --tiny` is a thin layer over it). To keep the
suite fast, all eight models run in float32 and two representatives also in bfloat16, and the
mutants of a model run in the same compare as `hf` (one oracle run per model).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

import llmdiff
from conftest import MUTANTS_DIR, run_by_candidate
from llmdiff.spec import capture_points, get_spec

BOTH_DTYPES = {"gemma-2-2b", "gemma-3-4b"}  # one per family, bfloat16 too
# The larger shapes run with the slow cases (the default suite keeps one per layer pattern).
_SLOW = pytest.mark.slow
MODELS = ["gemma-2-2b", "gemma-2-9b", pytest.param("gemma-2-27b", marks=_SLOW), "gemma-3-270m", "gemma-3-1b",
          pytest.param("gemma-3-4b", marks=_SLOW), pytest.param("gemma-3-12b", marks=_SLOW),
          pytest.param("gemma-3-27b", marks=_SLOW)]


@functools.lru_cache(maxsize=None)
def compared(model: str) -> dict:
    """The report of `hf` and this model's mutants against the oracle (computed once)."""
    dtypes = ["float32", "bfloat16"] if model in BOTH_DTYPES else ["float32"]
    impls = ["hf"] + [f"hf_mutants:{name}" for name, _ in MUTANTS.get(model, [])]
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(MUTANTS_DIR), saved or ""])  # workers import mutants
    try:
        # diagnose=False: these tests are about capture and first divergence, not the checks
        return llmdiff.compare(model, impls=impls, tiny=True, dtypes=dtypes, diagnose=False).report
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.mark.parametrize("model", MODELS)
def test_hf_matches_the_oracle(model):
    report = compared(model)
    dtypes = report["options"]["dtypes"]
    assert all(i["ok"] for i in report["implementations"]), report["implementations"]
    hf = next(i for i in report["implementations"] if i["name"] == "hf")
    assert hf["details"]["attn_implementation"] == "eager"
    for dtype in dtypes:
        run = run_by_candidate(report, "hf", dtype)
        assert run["verdict"] == "parity"
        # every canonical point, post norms included, captured on both sides
        assert [p["name"] for p in run["points"]] == capture_points(get_spec(model, tiny=True))
        assert run["missing_points"] == []
    logits = next(p for p in run_by_candidate(report, "hf", "float32")["points"] if p["name"] == "logits")
    assert logits["rel_l2"] <= 1e-5


# (model, mutant, first point where the bug acts)
MUTANTS = {
    "gemma-2-2b": [("NoAttnSoftcap", "L0.attn_out"),             # the scores, not q/k/v
                   ("SlidingWindowOnWrongLayers", "L0.attn_out"),  # same RoPE on both types
                   ("SlidingWindowOffByOne", "L0.attn_out")],
    "gemma-2-27b": [("HeadDimQueryScale", "L0.attn_out")],        # q is captured before scaling
    "gemma-3-4b": [("NoGlobalRopeScaling", "L5.q"),               # the first global layer
                   ("SlidingWindowOnWrongLayers", "L0.q")],       # Gemma 3: wrong RoPE base too
}


@pytest.mark.parametrize("model", [pytest.param(m, marks=_SLOW) if m == "gemma-3-4b" else m for m in sorted(MUTANTS)])
def test_mutants_diverge_where_the_bug_acts(model):
    report = compared(model)
    assert report["exit_code"] == 1  # divergence, not an error
    for name, where in MUTANTS[model]:
        run = run_by_candidate(report, f"hf_mutants:{name}", "float32")
        assert (run["verdict"], run["first_divergence"]) == ("divergence", where), name
        point = next(p for p in run["points"] if p["name"] == where)
        assert point["rel_l2"] > 100 * point["noise_floor"], name  # far above noise, not marginal


def test_a_grad_run_leaves_nothing_behind_for_the_next_run(tmp_path):
    """The next run's load frees the last run's model at once: after --grad the Trainer and the
    model refer to each other (a cycle only the garbage collector breaks), and a full-size
    float32 model stayed on the GPU through the bfloat16 run (127 GB peak on an H200)."""
    import weakref

    from llmdiff import inputs, weights
    from llmdiff.job import Job, Options, RunId, RunRequest, WeightsSource
    from llmdiff.references.hf import HFReference

    spec = get_spec("gemma-7b", tiny=True)
    hf_dir = weights.write_hf_config(tmp_path / "hf-config", spec)
    prompts = [inputs.synthetic_prompts(spec, s, (n,))[0] for s, n in ((0, 24), (1, 12))]
    job = Job(spec=spec.to_dict(), tokens=prompts, options=Options(device="cpu", stream=False),
              weights=WeightsSource(hf_dir=str(hf_dir), seed=0), grad=True)
    adapter = HFReference(job)
    for dtype in ("float32", "bfloat16"):
        request = RunRequest(RunId(dtype), str(tmp_path / dtype), job.options)
        adapter.begin(request)
        adapter.load(request)
        if dtype == "float32":
            for t in prompts:
                adapter.run_grad(t)
            assert adapter._trainer and "error" not in adapter._trainer   # the Trainer's step ran
            last = weakref.ref(next(adapter.model.parameters()))
    assert last() is None


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("impl", ["hf", "oracle"])
@pytest.mark.parametrize("dtype, round_to", [("float32", None), ("bfloat16", None), ("float64", "bfloat16")])
def test_points_sketched_in_batches_are_each_points_own_sketch(tmp_path, monkeypatch, impl, dtype, round_to, device):
    """The forward's points are sketched in batches (`hf._Batched`: buffers small enough here
    for several sketches of each group of points of one width; the oracle's steps, each its
    points of one width together): every point's sketch is the host's sketch of its whole
    capture (`sketch.project`, float64): to float64's rounding, and in a bfloat16 run, and a
    float64 run that measures a bfloat16 floor (of the capture rounded to bfloat16 first), in
    float32 arithmetic (`sketch.arithmetic`, 16-bit products accumulated in float32), off by
    under 1% of the smallest floor judged. On a GPU (16-bit products on cuBLAS, float32 out)
    each capture runs in a worker of its own, as compare runs it: JAX's platform is one a
    process, and this process's oracle cases run on the CPU."""
    from llmdiff import diff, inputs, safetensors_file, sketch, weights
    from llmdiff.job import Job, Options, RunId, RunRequest, WeightsSource
    from llmdiff.references import hf, oracle
    from llmdiff.runner import Implementation, run_worker

    if device == "cuda" and not _has_gpu():
        pytest.skip("no GPU: this case runs on a device (16-bit products on cuBLAS, float32 out)")
    if device == "cuda" and impl == "hf" and dtype == "float64":
        pytest.skip("a worker runs no float64 run of hf (the oracle's measure the floors)")
    if device == "cuda" and impl == "oracle" and dtype == "float32":
        # Its whole and its sketched capture are two runs, two compilations: on a GPU they differ
        # in their last bits, more than float64's rounding this case allows.
        pytest.skip("the oracle's two float32 runs on a GPU are not bit-identical")
    spec = get_spec("gemma-2-2b", tiny=True)
    hf_dir = weights.write_hf_config(tmp_path / "hf-config", spec)
    prompt, = inputs.synthetic_prompts(spec, 0, (24,))
    constants = round_to
    sketched_at_once = []   # points in each buffer sketched
    kept = 4 if dtype == "float32" else 2   # bytes a value: points wait in their own dtype, or rounded
    monkeypatch.setattr(hf._Batched, "CHUNK", 24 * spec.hidden_size * kept * 5)   # about 5 points of the hidden width
    sketch_group = hf._Batched._sketch
    monkeypatch.setattr(hf._Batched, "_sketch", lambda self, key: (sketched_at_once.append(len(self.groups[key][0])),
                                                                   sketch_group(self, key)))
    caps = {}
    for capture in ("full", "sketch"):
        job = Job(spec=spec.to_dict(), tokens=[prompt], options=Options(device=device, stream=False),
                  weights=WeightsSource(hf_dir=str(hf_dir), seed=0), capture=capture)
        request = RunRequest(RunId(dtype, constants), str(tmp_path / capture), job.options)
        if device == "cuda":
            r, = run_worker(Implementation.parse(impl), job, [request], tmp_path)
            assert r.ok, r.error
            caps[capture] = safetensors_file.load(r.captures_path)
            continue
        adapter = hf.HFReference(job) if impl == "hf" else oracle.OracleReference(job)
        adapter.begin(request)
        adapter.load(request)
        caps[capture] = adapter.run(prompt)
        if impl == "hf":   # the capture's wrapped forwards are undone (`hf._Taps`)
            assert not [m for m in adapter.model.modules() if "forward" in m.__dict__]
    whole, sketched = caps["full"], caps["sketch"]
    widths = {spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.mlp_dim,
              spec.vocab_size}
    if impl == "hf" and device == "cpu":
        assert sum(sketched_at_once) == len(capture_points(spec)) and len(sketched_at_once) > len(widths) + 3
        assert max(sketched_at_once) <= 5
    for name in capture_points(spec):
        x = whole[name].reshape(1, len(prompt), -1)
        want = sketch.project(diff.round_to(x, round_to) if round_to else x)
        if dtype != "float32":
            est = diff.point_metrics(sketch.Sketch(sketched[name + ":sketch"]), sketch.Sketch(want))["rel_l2"]
            assert est < 0.01 * diff.MIN_FLOOR * diff.UNIT_ROUNDOFF["bfloat16"], name
        else:
            assert np.allclose(sketched[name + ":sketch"], want, rtol=1e-12, atol=0), name


def test_a_point_the_model_changes_in_place_is_sketched_as_it_was_taken(tmp_path):
    """A sketched point waits as the model's own tensor (`hf._Batched`); a model that changes it
    in place afterwards (here each MLP doubles its input once done with it, the tensor taken as
    `L{i}.mlp_norm`) is run again with those points copied as they are taken, and from then on
    copies them at once: every sketch is the one of the point as it was taken."""
    from llmdiff import inputs, sketch, weights
    from llmdiff.job import Job, Options, RunId, RunRequest, WeightsSource
    from llmdiff.references import hf

    spec = get_spec("gemma-2-2b", tiny=True)
    hf_dir = weights.write_hf_config(tmp_path / "hf-config", spec)
    prompt, = inputs.synthetic_prompts(spec, 0, (24,))
    caps, forwards = {}, []
    for capture in ("full", "sketch"):
        job = Job(spec=spec.to_dict(), tokens=[prompt], options=Options(device="cpu", stream=False),
                  weights=WeightsSource(hf_dir=str(hf_dir), seed=0), capture=capture)
        adapter = hf.HFReference(job)
        request = RunRequest(RunId("float32"), str(tmp_path / capture), job.options)
        adapter.begin(request)
        adapter.load(request)
        for layer in adapter.model.model.layers:
            def doubled_after(x, mlp=layer.mlp, forward=layer.mlp.forward):
                forwards.append(capture)
                out = forward(x)
                x.mul_(2)
                return out
            layer.mlp.forward = doubled_after
        caps[capture] = adapter.run(prompt)
    layers = spec.num_layers
    assert forwards == ["full"] * layers + ["sketch"] * 2 * layers   # the sketched forward ran twice
    assert adapter._points_changed_in_place == {f"L{i}.mlp_norm" for i in range(layers)}
    again = adapter.run(prompt)
    assert len(forwards) == 4 * layers   # and once from then on
    for name in capture_points(spec):
        want = sketch.project(caps["full"][name].reshape(1, len(prompt), -1))
        for got in (caps["sketch"], again):
            assert np.allclose(got[name + ":sketch"], want, rtol=1e-12, atol=0), name


def test_a_point_with_no_version_counter_waits_as_a_copy():
    """An inference-mode tensor keeps no version counter (`hf._Batched` could not tell a later
    in-place change): it waits as a copy."""
    import torch

    from llmdiff.references import hf

    class Identity:   # a reference whose "sketch" is the values themselves
        round_to = None

        def _project(self, x, wide=True):
            return x.float()

    with torch.inference_mode():
        t = torch.ones(1, 2, 3)
    batch = hf._Batched(Identity(), set())
    batch.add("p", t)
    with torch.inference_mode():
        t.mul_(2)   # the model changes it afterwards
    assert np.array_equal(batch.finish(pin=False)["p:sketch"], np.ones((1, 2, 3))) and not batch.changed


def test_taps_wrap_each_forward_once_and_leave_it_as_found():
    """`hf._Taps`: every callback of a module around one wrapper of its forward, the forward an
    instance had of its own (accelerate's device hooks set one) kept under it and put back; a
    module with torch hooks of its own (a porter's patch that changes its output) hooked after
    them, so that its callbacks see what it gives."""
    import torch

    from llmdiff.references.hf import _Taps

    plain, own, hooked = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    hooked.register_forward_hook(lambda module, args, out: out * 0)
    taps = _Taps()
    taps.after(hooked, lambda out: seen.append(("hooked", float(out.abs().sum()))))
    seen = []
    undo = taps.install()
    hooked(torch.ones(1, 2))
    assert seen == [("hooked", 0.0)] and "forward" not in hooked.__dict__
    for u in undo:
        u()
    assert len(hooked._forward_hooks) == 1 and not hooked._forward_pre_hooks

    def own_forward(x):
        return x * 2
    own.forward = own_forward
    seen = []
    taps = _Taps()
    taps.before(plain, lambda args, kwargs: seen.append(("before", tuple(args[0].shape), sorted(kwargs))))
    taps.after(plain, lambda out: seen.append(("after", tuple(out.shape))))
    taps.after(plain, lambda out: seen.append(("after again", tuple(out.shape))))
    taps.after(own, lambda out: seen.append(("own", float(out.sum()))))
    undo = taps.install()
    x = torch.ones(1, 2)
    plain(x)
    own(x)
    assert seen == [("before", (1, 2), []), ("after", (1, 2)), ("after again", (1, 2)), ("own", 4.0)]
    assert len(undo) == 2
    for u in undo:
        u()
    assert "forward" not in plain.__dict__ and own.forward is own_forward
    seen.clear()
    plain(x)
    own(x)
    assert seen == []


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
