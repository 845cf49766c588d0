"""HF mutants are named by the right check, confirmed by counterfactual on the oracle."""

from __future__ import annotations

import pytest

from conftest import run_by_candidate


def _findings(report, code):
    return [f for f in report["findings"] if f["code"] == code]


def test_exact_gelu_is_named_and_confirmed(llmdiff_cli, mutants_on_path, tmp_path):
    code, out, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--impl", "hf_mutants:ExactGelu",
                                         "--dtype", "float32", "--workdir", str(tmp_path / "work"))
    assert code == 1
    # Every phase is told as it happens (a pipe gets plain lines), and the live log has them timed.
    log = (tmp_path / "work" / "progress.log").read_text()
    for phase in ("running oracle", "comparing every point", "teacher forcing", "diagnosing", "oracle run(s)"):
        assert phase in log and phase in out + err, phase
    run = run_by_candidate(report, "hf_mutants:ExactGelu", "float32")
    assert run["verdict"] == "divergence"
    assert run["first_divergence"] == "L0.mlp_act"  # gate and up are still right; act(gate)*up is not
    assert "first divergence at L0.mlp_act" in out
    (f,) = report["findings"]
    assert (f["code"], f["name"], f["where"], f["confirmed"]) == ("LD301", "gelu-exact-vs-tanh", "L0.mlp_act", True)
    ev = f["evidence"]
    assert ev["knob"] == {"gelu": "exact"}
    assert ev["before"]["floor_ratio"] > 50 and ev["after"]["floor_ratio"] < 8  # collapses to the floor
    assert ev["divergent_points"]["after"] == 0
    assert "gelu_pytorch_tanh" in f["fix"]
    assert "LD301 gelu-exact-vs-tanh" in out


def test_python_float_embed_scale_is_named_in_bf16_only(llmdiff_cli, mutants_on_path):
    code, _, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--impl", "hf_mutants:PythonFloatEmbedScale")
    assert code == 1
    assert run_by_candidate(report, "hf_mutants:PythonFloatEmbedScale", "float32")["verdict"] == "parity"
    bf16 = run_by_candidate(report, "hf_mutants:PythonFloatEmbedScale", "bfloat16")
    assert bf16["first_divergence"] == "embed"
    assert 1e-3 < bf16["points"][0]["rel_l2"] < 1e-2  # 27.75 vs 27.7128-ish: a few parts in a thousand
    (f,) = report["findings"]
    assert (f["code"], f["dtype"], f["where"], f["confirmed"]) == ("LD101", "bfloat16", "embed", True)
    assert f["evidence"]["after"]["rel_l2"] == 0  # the oracle with the bug is bit-identical


def test_clean_hf_has_no_findings_and_ignore_works(llmdiff_cli, mutants_on_path):
    code, _, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--dtype", "float32")
    assert code == 0 and report["findings"] == []
    code, _, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--impl", "hf_mutants:ExactGelu",
                                     "--dtype", "float32", "--ignore", "LD3")
    assert code == 1
    (f,) = report["findings"]
    assert f["code"] == "LD000" and f["where"] == "L0.mlp_act"  # without LD301 it is unexplained
    assert "unexplained divergence starting at L0.mlp_act" in f["message"]


def test_norm_without_plus_one_and_untied_lm_head(llmdiff_cli, mutants_on_path):
    """Two headline bugs in one run: a Llama RMSNorm on Gemma weights, an untied output projection."""
    code, _, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--dtype", "float32",
                                     "--impl", "hf_mutants:NormWithoutPlusOne", "--impl", "hf_mutants:UntiedLmHead")
    assert code == 1
    by_impl = {}
    for f in report["findings"]:
        by_impl.setdefault(f["implementation"], []).append(f)
    (norm,) = by_impl["hf_mutants:NormWithoutPlusOne"]
    assert (norm["code"], norm["where"], norm["confirmed"]) == ("LD202", "L0.attn_norm", True)
    assert norm["evidence"]["after"]["floor_ratio"] < 8 < norm["evidence"]["before"]["floor_ratio"]
    (head,) = by_impl["hf_mutants:UntiedLmHead"]  # static evidence; its logits divergence is not "unexplained"
    assert (head["code"], head["where"]) == ("LD105", "logits")
    assert head["evidence"]["tied_lm_head"] is False and head["evidence"]["max_abs_diff"] > 0
    assert run_by_candidate(report, "hf_mutants:UntiedLmHead", "float32")["first_divergence"] == "logits"


def test_rope_in_bfloat16_is_confirmed_teacher_forced(llmdiff_cli, mutants_on_path):
    """Below the accumulated bfloat16 noise free-running, yet confirmed where it acts."""
    code, _, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--dtype", "bfloat16",
                                     "--impl", "hf_mutants:RopeInBFloat16")
    assert code == 1
    run = run_by_candidate(report, "hf_mutants:RopeInBFloat16", "bfloat16")
    assert run["local_divergence"] == "L0.q"
    (f,) = report["findings"]
    assert (f["code"], f["where"], f["confirmed"]) == ("LD401", "L0.q", True)
    assert f["evidence"]["teacher_forced"] and f["evidence"]["after"]["rel_l2"] < f["evidence"]["before"]["rel_l2"] / 10


@pytest.mark.slow   # ~360 counterfactual oracle runs (pairs of knobs, each also on one layer kind): 3.5 min here
def test_two_bugs_on_two_kinds_of_layer_are_both_named(llmdiff_cli, mutants_on_path):
    """Gemma 2 whose sliding-window layers lost the causal part of their mask (global layers are
    right) and whose attention soft-cap is gone everywhere: both named, each confirmed, the mask
    bug said to act on sliding-window layers only; nothing left unexplained."""
    code, out, _, report = llmdiff_cli("compare", "gemma-2-2b", "--tiny", "--dtype", "float32",
                                       "--impl", "hf_mutants:SlidingMaskWithoutCausalNoSoftcap")
    assert code == 1, out
    by_code = {f["code"]: f for f in report["findings"]}
    assert set(by_code) == {"LD505", "LD501"}, report["findings"]
    assert all(f["confirmed"] for f in by_code.values())
    mask = by_code["LD505"]
    assert mask["evidence"]["scope"] == "local" and mask["evidence"]["knob"]["causal@local"] is False
    assert "causal" not in mask["evidence"]["knob"]   # never on the global layers
    assert "on sliding-window (local) layers only" in mask["message"]
    assert "scope" not in by_code["LD501"]["evidence"]


@pytest.mark.slow
def test_a_window_off_by_one_is_said_to_start_past_the_window(llmdiff_cli, mutants_on_path, tmp_path):
    """The extra key is visible only from position `window` on: the error is 0 before it, and
    the finding says from which position it acts."""
    from llmdiff.spec import get_spec

    window = get_spec("gemma-2-2b", tiny=True).sliding_window
    code, out, _, report = llmdiff_cli("compare", "gemma-2-2b", "--tiny", "--dtype", "float32",
                                       "--impl", "hf_mutants:SlidingWindowOffByOne", "--out", str(tmp_path / "out"))
    assert code == 1, out
    (f,) = report["findings"]
    assert f["code"] == "LD503" and f["confirmed"]
    assert f["evidence"]["from_position"] == window and f"from position {window} on" in f["message"]
    run = run_by_candidate(report, "hf_mutants:SlidingWindowOffByOne", "float32")
    first = next(p for p in run["points"] if p["name"] == run["first_divergence"])
    assert max(first["by_position"][:window]) < 1e-5 < 1e-3 < min(first["by_position"][window:window + 8])
    assert f"from position {window} on (the error grows along the sequence)" in out
    # The HTML report draws the layer x position heat map and the finding's before/after curves.
    page = (tmp_path / "out" / "report.html").read_text()
    assert "alt='error per layer and position, " in page and "alt='evidence of LD503: before and after'" in page
    curve = f["evidence"]["curve"]
    assert len(curve["points"]) == len(curve["before"]) == len(curve["after"]) == len(run["points"])
    assert max(v for v in curve["after"] if v is not None) < 1e-5 < max(curve["before"])
    _screenshot_where_chromium_exists(tmp_path / "out" / "report.html", tmp_path / "report.png")


def _screenshot_where_chromium_exists(page, png):
    """Headless Chromium renders the report (every image decodes, the page is not blank); skipped
    where no Chromium is installed (this machine has none)."""
    import shutil
    import subprocess

    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome")
                    if shutil.which(b)), None)
    if browser is None:
        return
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                    "--window-size=1200,3000", page.as_uri()], check=True, timeout=120, capture_output=True)
    from matplotlib.image import imread

    pixels = imread(png)
    assert pixels.shape[0] >= 3000 and pixels.std() > 0.05   # drawn, not a blank page


def test_a_dead_oracle_worker_is_retried_past_the_run_that_kills_it(monkeypatch, tmp_path):
    """The runs a crashed worker never reached get a fresh worker; a run that kills every worker
    it starts in is that run's error alone (signal 11 of XLA's CPU compiler was seen here)."""
    from llmdiff import diagnose
    from llmdiff.job import Job, WeightsSource
    from llmdiff.runner import RunResult

    workers = []

    def fake_batch(lab, requests, progress):   # the lab's worker, dying where poisoned
        workers.append(len(requests))
        out, dead = [], False
        for r in requests:
            dead = dead or dict(r.options.precision).get("poison", False)
            out.append(RunResult("oracle", r.id, False, "worker for 'oracle' was killed by signal 11", None,
                                 {"python": "x"}, r.out) if dead else
                       RunResult("oracle", r.id, True, None, r.out, {"ok": True}, r.out))
        return out, True   # a worker started for each batch

    monkeypatch.setattr(diagnose.OracleLab, "_batch", fake_batch)
    monkeypatch.setattr(diagnose.diff, "load_captures", lambda path: {"path": path})
    lab = diagnose.OracleLab(Job(spec={}, tokens=[[1]], weights=WeightsSource(canonical="w")), tmp_path)
    policies = [{"a": 1}, {"poison": True}, {"b": 2}, {"c": 3}]
    caps = lab.captures("float32", policies)
    assert [c is not None for c in caps] == [True, False, True, True]
    assert workers == [4, 3, 2]      # all four; then from the poison one; then past it
    (error,) = lab.errors.values()
    assert "signal 11" in error and "fresh worker" in error
    assert len({c["path"] for c in caps if c}) == 3 and lab.runs == 4


def test_a_served_worker_that_dies_on_its_next_batch_blames_no_run(monkeypatch, tmp_path):
    """A serving worker that ran earlier batches and dies on the first run of the next one may
    have died of those: that run is not its crash; it runs again in a fresh worker and is kept."""
    from llmdiff import diagnose
    from llmdiff.job import Job, WeightsSource
    from llmdiff.runner import RunResult

    batches = []

    def fake_batch(lab, requests, progress):   # up after one batch; dies as the second starts
        fresh = len(batches) != 1
        batches.append((len(requests), fresh))
        if not fresh:
            return [RunResult("oracle", r.id, False, "worker for 'oracle' was killed by signal 11", None,
                              {"python": "x"}, r.out) for r in requests], False
        return [RunResult("oracle", r.id, True, None, r.out, {"ok": True}, r.out) for r in requests], True

    monkeypatch.setattr(diagnose.OracleLab, "_batch", fake_batch)
    monkeypatch.setattr(diagnose.diff, "load_captures", lambda path: {"path": path})
    lab = diagnose.OracleLab(Job(spec={}, tokens=[[1]], weights=WeightsSource(canonical="w")), tmp_path)
    assert lab.captures("float32", [{"a": 1}])[0] is not None
    caps = lab.captures("float32", [{"b": 2}, {"c": 3}])
    assert all(c is not None for c in caps) and lab.errors == {}
    assert batches == [(1, True), (2, False), (2, True)]   # the second batch again, in a fresh worker
    assert lab.runs == 3


def test_a_noise_amplifying_knob_is_judged_against_its_own_floor(tmp_path):
    """A knob that reads a table at a float16-rounded input (LD302's) turns float32 noise into
    float16 steps: the oracle with it on is itself far from its float64 run. Its trial is judged
    against that floor, at the first divergent point and every later one (the amplified noise
    propagates); the same data with the clean floor alone is no explanation."""
    import numpy as np

    from llmdiff import diff, diagnose
    from llmdiff.check import Check
    from llmdiff.spec import get_spec

    class Table(Check):
        """## What it finds
        x."""
        code, name, knob, dtypes, own_floor = "LD999", "table-lookup", ("gelu", "f16_table"), ("float32",), True

    rng = np.random.default_rng(0)
    shape, points = (1, 16, 256), ["L0.mlp_act", "L1.mlp_act"]
    x = rng.normal(size=shape)
    step = 2.0 ** -8

    def table(v, flips):   # a step function of v; `flips` of its entries one step off
        out = np.round(v / step) * step
        out.ravel()[flips] += step
        return out

    flips = [rng.choice(x.size, 40, replace=False) for _ in range(3)]
    clean32 = {p: (x * (i + 1)).astype(np.float32) for i, p in enumerate(points)}
    clean64 = {p: x * (i + 1) + 1e-9 for i, p in enumerate(points)}
    knob64 = {p: table(x * (i + 1), []) for i, p in enumerate(points)}
    knob32 = {p: table(x * (i + 1), flips[0]).astype(np.float32) for i, p in enumerate(points)}
    cand = {p: table(x * (i + 1), flips[1 + i % 2]).astype(np.float32) for i, p in enumerate(points)}
    floors = diff.noise_floors(clean32, clean64, "float32")

    class Lab:
        def captures(self, dtype, policies, constants_dtype=None, forced_from=None):
            return [(knob64 if dtype == "float64" else knob32) if p.get("gelu") == "f16_table"
                    else clean32 if not p else None for p in policies]

    spec = get_spec("gemma-7b", tiny=True)
    run = diff.compare_captures(cand, clean32, floors, "float32", points)
    assert run["first_divergence"] == "L0.mlp_act"
    for own_floor in (True, False):
        Table.own_floor = own_floor
        case = diagnose.Case(Lab(), spec, "cand", cand, None, floors, points)
        (f,) = diagnose.explain(case, [Table()], run)
        if not own_floor:   # against the clean floor the knob brings nothing back: unexplained
            assert f.code == "LD000" and f.where == "L0.mlp_act"
            continue
        assert (f.code, f.where, f.confirmed) == ("LD999", "L0.mlp_act", True)
        own = diff.noise_floors(knob32, knob64, "float32")
        assert f.evidence["hypothesis_floor"] == own["L0.mlp_act"] > 100 * floors["L0.mlp_act"]
        assert f.evidence["after"]["floor_ratio"] <= 8 and f.evidence["divergent_points"]["after"] == 0
        assert "amplifies rounding noise" in f.message
        # The later point too is judged against the knob-on oracle's own floor there.
        judged = diagnose.Case(Lab(), spec, "cand", cand, None, floors, points, amplifiers=(Table.knob,)).judge(
            {"gelu": "f16_table"}, knob32, floors, "float32", None)
        assert [p["noise_floor"] for p in judged["points"]] == [own[p] for p in points]


def test_the_lab_forgets_its_runs_and_their_files(tmp_path):
    """A selftest's runs of one dtype (tens of GB at tiny size) go before the next dtype's:
    forgotten runs leave the cache, and their captures files the disk."""
    from llmdiff import diagnose
    from llmdiff.job import Job, WeightsSource
    from llmdiff.spec import get_spec

    kept = tmp_path / "canonical.safetensors"
    kept.write_bytes(b"weights")
    job = Job(spec=get_spec("gemma-7b", tiny=True).to_dict(), tokens=[[2, 3]],
              weights=WeightsSource(canonical=str(kept)))
    lab = diagnose.OracleLab(job, tmp_path)
    runs = [diagnose.Variant.of("float32"), diagnose.Variant.of("float32", {"gelu": "exact"})]
    for i, v in enumerate(runs):
        path = tmp_path / f"oracle-variant-{i:04d}.safetensors"
        path.write_bytes(b"captures")
        lab.cache[v], lab.paths[v] = {}, str(path)
    lab.forget()
    assert lab.cache == {} and lab.paths == {} and all(lab.path(v) is None for v in runs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canonical.safetensors"]


@pytest.mark.slow   # a compare with diagnosis
def test_a_diagnosis_starts_from_the_compares_own_clean_oracle_runs(llmdiff_cli, mutants_on_path, monkeypatch):
    """The clean oracle at the run's dtype and its float64 answer are the compare's own runs:
    the diagnosis asks a worker for neither, and names the bug as before."""
    from llmdiff import diagnose
    from llmdiff.job import RunId

    asked, run_many = [], diagnose.OracleLab.run_many

    def recorded(lab, wanted):
        asked.extend(v for v in wanted if v not in lab.cache)
        return run_many(lab, wanted)

    monkeypatch.setattr(diagnose.OracleLab, "run_many", recorded)
    code, out, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--impl", "hf_mutants:ExactGelu",
                                         "--dtype", "float32", "--no-tokenizer-parity")
    assert code == 1, out + err
    assert [(f["code"], f["confirmed"]) for f in report["findings"]] == [("LD301", True)]
    assert asked and not {diagnose.Variant(RunId("float32")), diagnose.Variant(RunId("float64", "float32"))} & set(asked)
