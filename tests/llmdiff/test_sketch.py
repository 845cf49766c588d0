import math

import numpy as np
import pytest

from llmdiff import diff, sketch


def _sketch(x, R):
    x = x.reshape(*x.shape[:2], -1).astype(np.float64)
    return sketch.Sketch(np.concatenate([x @ R, (x * x).sum(-1, keepdims=True)], -1))


def test_projection_is_fixed_and_scaled():
    R = sketch.projection(300)
    assert np.array_equal(R, sketch.projection(300))
    assert set(np.unique(R)) == {-1 / 8, 1 / 8}
    G = R.T @ R
    assert np.allclose(np.diag(G), 300 / 64)


@pytest.mark.parametrize("scale", [1e-7, 1e-3, 1e-1])
def test_sketched_rel_l2_estimates_the_exact_one(scale):
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((1, 200, 4, 24)).astype(np.float32)
    cand = ref + (scale * rng.standard_normal(ref.shape)).astype(np.float32)
    R = sketch.projection(96)
    exact = diff.point_metrics(cand, ref)
    est = diff.point_metrics(_sketch(cand, R), _sketch(ref, R))
    assert est["rel_l2"] == pytest.approx(exact["rel_l2"], rel=0.05)
    assert est["cosine"] == pytest.approx(exact["cosine"], abs=1e-9 + 0.05 * (1 - exact["cosine"]))
    assert est["max_abs"] is None and est["estimated"]


def test_sketch_of_identical_and_of_nonfinite_values():
    x = np.ones((1, 3, 8), np.float32)
    R = sketch.projection(8)
    assert diff.point_metrics(_sketch(x, R), _sketch(x, R))["rel_l2"] == 0.0
    bad = x.copy()
    bad[0, 1, 2] = np.nan
    m = diff.point_metrics(_sketch(bad, R), _sketch(x, R))
    assert not m["finite"]
    # inf where the reference has the same inf: the difference is nan, still not finite
    inf = sketch.Sketch(np.where(np.arange(9) == 4, np.inf, 1.0).reshape(1, 1, 9))
    assert not diff.point_metrics(inf, sketch.Sketch(inf.data.copy()))["finite"]
    # a bad reference does not make the candidate non-finite
    assert diff.point_metrics(_sketch(x, R), _sketch(bad, R))["finite"]
    with pytest.raises(ValueError, match="sketched"):
        diff.point_metrics(_sketch(x, R), x)


def test_float32_sketches_are_compared_as_float64_would_be():
    """16-bit values' sketches leave the device in float32: subtracted in float32, squared and
    summed pairwise in float32 (norms in float64), their rel_l2 is float64's to 1e-6 (values of
    mixed sign and scale; a realistic norms column, |x|^2 > 0)."""
    rng = np.random.default_rng(1)
    R = sketch.projection(256)
    x = rng.standard_normal((1, 512, 256)) * np.logspace(-3, 3, 512)[:, None]
    y = x * (1 + 1e-3 * rng.standard_normal(x.shape))
    ref, cand = (_sketch(v, R).data.astype(np.float32) for v in (x, y))
    got = sketch.metrics(sketch.Sketch(cand), sketch.Sketch(ref))
    want = sketch.metrics(sketch.Sketch(cand.astype(np.float64)), sketch.Sketch(ref.astype(np.float64)))
    assert 1e-4 < want["rel_l2"] < 1e-2 and got["finite"]
    assert got["rel_l2"] == pytest.approx(want["rel_l2"], rel=1e-6)
    assert got["cosine"] == pytest.approx(want["cosine"], abs=1e-9) and want["cosine"] < 1


@pytest.mark.parametrize("threads", [1, 2])
def test_a_runs_points_are_compared_at_once_as_one_by_one(tmp_path, monkeypatch, threads):
    """A captures file's sketches lie side by side: `metrics_many` reads them as one array per
    side (no copy) and gives each pair's `metrics` of its own copies, in any order asked; split
    over threads too (points of 10 KB, a thread's share made that small)."""
    from llmdiff import safetensors_file

    if threads > 1:
        monkeypatch.setattr(sketch, "_THREAD_BYTES", 1)
        monkeypatch.setattr(sketch, "_cores", lambda: threads)

    rng = np.random.default_rng(2)
    names = [f"L{i}.{p}" for i in range(3) for p in ("q", "k", "out")]
    ref = {n + sketch.SUFFIX: rng.standard_normal((1, 40, sketch.K + 1)).astype(np.float32) for n in names}
    cand = {k: (r * (1 + 1e-2 * rng.standard_normal(r.shape))).astype(np.float32) for k, r in ref.items()}
    cand["logits:top_ids"] = np.zeros((1, 40, sketch.TOP), np.int32)   # another tensor in the file
    for side, caps in (("cand", cand), ("ref", ref)):
        safetensors_file.save(tmp_path / f"{side}.safetensors", caps)
    cand, ref = (diff.load_captures(tmp_path / f"{side}.safetensors") for side in ("cand", "ref"))
    order = names[::-1]   # not the file's order
    assert sketch._stacked([cand[n].data for n in sorted(names)]) is not None
    got = sketch.metrics_many([(cand[n], ref[n]) for n in order])
    for n, m in zip(order, got):
        alone = sketch.metrics_many([(sketch.Sketch(cand[n].data.copy()), sketch.Sketch(ref[n].data.copy()))])[0]
        assert m["rel_l2"] == pytest.approx(alone["rel_l2"], rel=1e-12) and m["rel_l2"] > 1e-3
        assert m["cosine"] == pytest.approx(alone["cosine"], abs=1e-12)
    # arrays of their own (not side by side) are compared one by one (as `alone` above)
    assert sketch._stacked([sketch.Sketch(cand[n].data.copy()).data for n in names]) is None


def test_float32_sketches_past_float32s_squares_are_compared_in_float64():
    ref = np.full((1, 4, sketch.K + 1), 1e20, np.float32)
    cand = ref * np.float32(1.5)   # differences of 5e19: their float32 squares overflow
    m = sketch.metrics(sketch.Sketch(cand), sketch.Sketch(ref))
    want = sketch.metrics(sketch.Sketch(cand.astype(np.float64)), sketch.Sketch(ref.astype(np.float64)))
    assert m["finite"] and math.isfinite(m["rel_l2"]) and m["rel_l2"] == pytest.approx(want["rel_l2"], rel=1e-12)


def test_floors_are_of_points_not_of_the_logits_top_k():
    R = sketch.projection(8)
    x = np.ones((1, 3, 8), np.float32)
    top = {"logits:top_values": np.ones((1, 3, 8), np.float32), "logits:top_ids": np.zeros((1, 3, 8), np.int32)}
    caps = {"L0.q": _sketch(x, R), "logits": _sketch(x, R), **top}
    assert set(diff.noise_floors(caps, dict(caps), "bfloat16")) == {"L0.q", "logits"}


def test_top_metrics_break_ties_like_argmax():
    values = np.array([[[3.0, 5.0, 5.0, 1.0]]], np.float32)
    cand = {"logits:top_values": values, "logits:top_ids": np.array([[[7, 9, 2, 4]]])}
    ref = {"logits:top_values": values, "logits:top_ids": np.array([[[7, 2, 9, 4]]])}
    m = sketch.top_metrics(cand, ref, 2)
    assert m == {"kl_mean": None, "top1_agreement": 1.0, "topk_overlap": 1.0, "k": 2}
    assert sketch.top_ids(values, cand["logits:top_ids"], 2).tolist() == [[[2, 9]]]


def test_worker_sketches_what_an_adapter_returned_whole():
    """An adapter that cannot sketch on its device (a third-party one) is sketched by its worker
    exactly as hf and the oracle sketch on theirs."""
    from llmdiff import worker

    rng = np.random.default_rng(1)
    caps = {"L0.q": rng.standard_normal((1, 5, 2, 4)).astype(np.float32),
            "logits": rng.standard_normal((1, 5, 40)).astype(np.float32)}
    out = worker._sketch_on_host(caps, None)
    R = sketch.projection(8)
    assert np.array_equal(out["L0.q:sketch"], _sketch(caps["L0.q"], R).data)
    assert out["logits:sketch"].shape == (1, 5, sketch.K + 1)
    ids = sketch.top_ids(out["logits:top_values"], out["logits:top_ids"], 3)
    assert np.array_equal(ids, np.argsort(-caps["logits"], axis=-1)[..., :3])
    rounded = worker._sketch_on_host({"L0.q": caps["L0.q"].astype(np.float64)}, "bfloat16")["L0.q:sketch"]
    assert np.array_equal(rounded, _sketch(diff.round_to(caps["L0.q"], "bfloat16"), R).data)


def test_weight_gradients_are_sketched_per_row_and_estimate_rel_l2():
    """A weight gradient (a, b, ...) is an a x (b * ...) matrix sketched per row: exact row
    norms, and the relative L2 of the whole tensor estimated as a point's is over positions."""
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((300, 4, 24))
    cand = ref + 1e-3 * rng.standard_normal(ref.shape)
    s_ref, s_cand = sketch.rows(ref), sketch.rows(cand)
    assert s_ref.shape == (300, sketch.K + 1)
    assert np.allclose(s_ref[:, -1], (ref.reshape(300, -1) ** 2).sum(-1), rtol=1e-14)
    exact = diff.point_metrics(cand, ref)
    est = diff.point_metrics(sketch.Sketch(s_cand), sketch.Sketch(s_ref))
    assert est["rel_l2"] == pytest.approx(exact["rel_l2"], rel=0.05) and est["estimated"]
    assert sketch.sketches_rows((3, 4)) and not sketch.sketches_rows((7,))


def test_worker_sketches_gradients_once_the_prompts_are_put_together():
    """`--grad --capture sketch` for an adapter that gives whole gradients: point gradients per
    position, weight gradients (summed over prompts first) per row; the loss, the loss cases and
    1-D weight gradients stay whole."""
    from llmdiff import grad, worker

    rng = np.random.default_rng(3)
    caps = {"loss": np.ones((1, 2), np.float32), "loss:batch": np.ones((1, 1), np.float32),
            "grad:L0.q": rng.standard_normal((1, 5, 2, 4)), "grad:w:L0.q": rng.standard_normal((2, 6, 4)),
            "grad:trainer:w:embed": rng.standard_normal((10, 6)), "grad:w:final_norm": rng.standard_normal(6)}
    out = worker._sketch_on_host(caps, None)
    assert set(out) == {"loss", "loss:batch", "grad:L0.q:sketch", "grad:w:L0.q:sketch",
                        "grad:trainer:w:embed:sketch", "grad:w:final_norm"}
    assert np.array_equal(out["grad:L0.q:sketch"], _sketch(caps["grad:L0.q"], sketch.projection(8)).data)
    assert np.array_equal(out["grad:w:L0.q:sketch"], sketch.rows(caps["grad:w:L0.q"]))
    assert out["grad:trainer:w:embed:sketch"].shape == (10, sketch.K + 1)
    assert out["grad:w:final_norm"] is caps["grad:w:final_norm"] and out["loss"] is caps["loss"]
    assert grad.is_weight("grad:w:L0.q:sketch") and grad.is_grad("grad:L0.q:sketch")
