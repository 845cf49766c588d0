import math

import ml_dtypes
import numpy as np

from llmdiff import diff


def test_point_metrics():
    ref = np.array([[3.0, 4.0]])
    m = diff.point_metrics(ref + np.array([[0.0, 0.5]]), ref)
    assert m["max_abs"] == 0.5 and m["mean_abs"] == 0.25
    assert math.isclose(m["rel_l2"], 0.1)
    assert 0.99 < m["cosine"] < 1
    assert diff.point_metrics(ref, ref)["rel_l2"] == 0
    assert not diff.point_metrics(np.array([np.nan, 1.0]), np.array([1.0, 1.0]))["finite"]


def test_logits_metrics():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(1, 10, 50))
    same = diff.logits_metrics(ref, ref)
    assert same["kl_mean"] < 1e-12 and same["top1_agreement"] == 1 and same["topk_overlap"] == 1
    other = diff.logits_metrics(rng.normal(size=(1, 10, 50)), ref)
    assert other["kl_mean"] > 0.1 and other["top1_agreement"] < 0.5


def test_round_to_bfloat16():
    x = np.array([27.712812921102035])
    assert diff.round_to(x, "bfloat16")[0] == 27.75
    assert diff.round_to(x, "float32")[0] == np.float32(27.712812921102035)


def test_verdict_is_relative_to_each_points_floor():
    rng = np.random.default_rng(0)
    truth = {"a": rng.normal(size=(1, 4, 8)), "b": rng.normal(size=(1, 4, 8))}
    oracle = {"a": diff.round_to(truth["a"], "bfloat16"),  # exact at a: floor 0
              "b": diff.round_to(truth["b"] * (1 + 0.01 * rng.normal(size=(1, 4, 8))), "bfloat16")}
    floors = diff.noise_floors(oracle, truth, "bfloat16")
    assert floors["a"] == 0 and 0.005 < floors["b"] < 0.02
    # The same 0.3% error: a divergence where the oracle is exact, noise where it is not.
    cand = {k: v * 1.003 for k, v in oracle.items()}
    run = diff.compare_captures(cand, oracle, floors, "bfloat16", ["a", "b"])
    verdicts = {p["name"]: p["verdict"] for p in run["points"]}
    assert verdicts == {"a": "divergence", "b": "parity"}
    assert run["first_divergence"] == "a" and run["verdict"] == "divergence"
    run = diff.compare_captures({k: v.copy() for k, v in oracle.items()}, oracle, floors, "bfloat16", ["a", "b"])
    assert run["verdict"] == "parity"


def test_missing_and_misshapen_points():
    a = {"x": np.ones((1, 2, 3)), "y": np.ones((1, 2, 3))}
    run = diff.compare_captures({"x": np.ones((1, 2, 4))}, a, {}, "float32", ["x", "y"])
    assert run["missing_points"] == ["y"]
    assert run["points"][0]["verdict"] == "divergence" and "shape" in run["points"][0]["note"]
