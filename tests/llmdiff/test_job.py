"""The worker's contract: a Job survives JSON, a run has one name."""

from __future__ import annotations

import json

from llmdiff.job import Job, Options, RunId, RunRequest, WeightsSource


def test_job_round_trips_through_json():
    job = Job(spec={"name": "x"}, tokens=[[2, 5, 6]], weights=WeightsSource(canonical="/w.safetensors", hf_dir="/hf"),
              options=Options(attn="sdpa", devices=2, precision={"gelu": "exact"}), points=["embed"],
              capture="sketch", impl="hf", module="m", cls="C", references_dir="/r",
              runs=(RunRequest(RunId("float64", "bfloat16"), "/out/a", Options(forced_from="/c.safetensors")),))
    assert Job.from_json(job.to_json()) == job


def test_a_run_has_one_label():
    assert RunId("float32").label == "float32" and str(RunId("float32")) == "float32"
    assert RunId("float64", "bfloat16").label == "float64-as-bfloat16"
    assert str(RunId("float64", "bfloat16")) == "float64 as bfloat16"
    assert {RunId("float32"): 1}[RunId("float32")] == 1  # a dict key


def test_weights_source_says_whether_made_on_the_device():
    assert WeightsSource(hf_dir="/c", seed=0).generated and not WeightsSource(canonical="/w").generated
    assert not WeightsSource(hf_dir="/c", from_hf=True).generated


def test_weights_read_from_an_hf_directory_round_trip_and_older_jobs_read_as_files():
    job = Job(spec={"name": "x"}, tokens=[[2, 5]], weights=WeightsSource(hf_dir="/hf", from_hf=True))
    assert Job.from_json(job.to_json()).weights == WeightsSource(hf_dir="/hf", from_hf=True)
    older = {**json.loads(job.to_json()), "weights": {"canonical": "/w", "hf_dir": "/hf", "seed": None}}
    assert Job.from_dict(older).weights.from_hf is False


def test_a_quantised_job_round_trips_and_an_unknown_type_is_refused():
    import pytest

    job = Job(spec={"name": "x"}, tokens=[[2, 5]], weights=WeightsSource(canonical="/w", hf_dir="/hf"), quant="q8_0")
    assert Job.from_json(job.to_json()) == job and Job.from_json(job.to_json()).quant == "q8_0"
    assert Job(spec={}, tokens=[], weights=WeightsSource()).quant is None
    with pytest.raises(ValueError, match="unknown quantisation 'q4_k'"):
        Job(spec={}, tokens=[], weights=WeightsSource(), quant="q4_k")
    with pytest.raises(ValueError, match="unknown quantisation"):
        Job.from_dict({**json.loads(job.to_json()), "quant": "Q8_0"})
