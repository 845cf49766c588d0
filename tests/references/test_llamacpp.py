"""llama.cpp as a compared implementation (`--impl llamacpp`) and `llmdiff audit MODEL.gguf`.

Everything here needs the llamacpp extra (its own virtualenv, llama-cpp-python built from source
and llama.cpp's converter: `python -m llmdiff.references.llamacpp install`) and is skipped
without it; the GGUF audit's spec logic is also tested on a GGUF written here with the `gguf`
package (a core dependency), which needs no extra.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_by_candidate
from llmdiff.references.llamacpp import INSTALL
from llmdiff.runner import venv_python
from llmdiff.spec import capture_points, get_spec

needs_llamacpp = pytest.mark.skipif(
    venv_python("llamacpp") is None,
    reason=f"the llamacpp extra is not installed (no {os.path.join('$LLMDIFF_VENVS', 'llamacpp')}): {INSTALL}")


def _point(run, name):
    return next(p for p in run["points"] if p["name"] == name)


# --- the GGUF audit, on a GGUF written here ----------------------------------------------------

def _write_gguf(path, spec, **overrides):
    """A metadata-only GGUF as llama.cpp's converter writes one for `spec` (tensors: the token
    table's shape only), with `overrides` {key: value or None to leave out}."""
    import gguf

    arch = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "llama": "llama"}[spec.family]
    w = gguf.GGUFWriter(str(path), arch)
    values = {
        f"{arch}.embedding_length": spec.hidden_size, f"{arch}.block_count": spec.num_layers,
        f"{arch}.feed_forward_length": spec.mlp_dim, f"{arch}.attention.head_count": spec.num_heads,
        f"{arch}.attention.head_count_kv": spec.num_kv_heads, f"{arch}.attention.key_length": spec.head_dim,
        f"{arch}.attention.value_length": spec.head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": float(spec.norm_eps), f"{arch}.rope.freq_base": float(spec.rope_base),
        "tokenizer.ggml.bos_token_id": spec.bos_id, "tokenizer.ggml.eos_token_id": spec.eos_id,
        "tokenizer.ggml.add_bos_token": spec.add_bos,
    }
    if spec.sliding_window:
        values[f"{arch}.attention.sliding_window"] = spec.sliding_window
    if spec.attn_softcap:
        values[f"{arch}.attn_logit_softcapping"] = float(spec.attn_softcap)
    if spec.final_softcap:
        values[f"{arch}.final_logit_softcapping"] = float(spec.final_softcap)
    values.update(overrides)
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, value)
    w.add_tensor("token_embd.weight", np.zeros((spec.hf_vocab_size or spec.vocab_size, spec.hidden_size), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_audit_names_each_metadata_defect(tmp_path):
    from llmdiff.audit import audit

    spec = get_spec("gemma-2-2b", tiny=True)
    clean = audit(_write_gguf(tmp_path / "clean.gguf", spec), "gemma-2-2b")
    assert clean, clean.summary()
    assert clean.report["model"] == spec.name and clean.report["format"] == "gguf"
    cases = {"LD706": {"gemma2.attention.layer_norm_rms_epsilon": 1e-5},
             "LD707": {"gemma2.rope.freq_base": 500000.0},
             "LD708": {"gemma2.attention.sliding_window": spec.sliding_window + 1},
             "LD709": {"gemma2.final_logit_softcapping": None},   # llama.cpp's default 30 is not the spec's
             "LD053": {"tokenizer.ggml.add_bos_token": False}}
    if spec.final_softcap == 30.0:
        cases["LD709"] = {"gemma2.final_logit_softcapping": 20.0}
    for code, change in cases.items():
        result = audit(_write_gguf(tmp_path / f"{code}.gguf", spec, **change), "gemma-2-2b")
        assert {f["code"] for f in result.findings} == {code}, (code, result.summary())


def test_gguf_audit_reads_llama_cpp_defaults_for_gemma3_layers(tmp_path):
    """No sliding_window_pattern: llama.cpp runs Gemma 3 as 5 local layers of 6."""
    from llmdiff.audit_gguf import GGUFMetadata, layer_kinds

    spec = get_spec("gemma-3-1b")
    meta = GGUFMetadata(_write_gguf(tmp_path / "g3.gguf", spec))
    assert layer_kinds(meta, "gemma3", spec.num_layers) == spec.layer_types


def test_gguf_audit_llama3_rope_factors_absent(tmp_path):
    from llmdiff.audit import audit

    spec = get_spec("llama-3.1-8b", tiny=True)
    result = audit(_write_gguf(tmp_path / "l.gguf", spec), "llama-3.1-8b")
    assert [(f["code"], f["where"]) for f in result.findings] == [("LD707", "gguf:rope_freqs.weight")]


# --- the install's wheel cache ------------------------------------------------------------------

def test_wheel_cache_is_llmdiffs_and_keyed_by_what_the_build_depends_on(monkeypatch, tmp_path):
    """The cache is $XDG_CACHE_HOME/llmdiff/wheels, never under $LLMDIFF_VENVS (CI's is a temporary
    directory); an entry's name changes with each of version, CMAKE_ARGS, Python, platform, CPU."""
    from llmdiff.references.llamacpp import CMAKE_ARGS, wheel_cache_root, wheel_key

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("LLMDIFF_VENVS", str(tmp_path / "venvs"))
    assert wheel_cache_root() == tmp_path / "cache" / "llmdiff" / "wheels"
    base = ("0.3.36", CMAKE_ARGS, "cp311", "linux-x86_64", "avx2 fma")
    key = wheel_key(*base)
    assert key == wheel_key(*base) and key.startswith("llama_cpp_python-0.3.36-cp311-linux-x86_64-")
    changed = [("0.3.37",), (CMAKE_ARGS + ("-DGGML_NATIVE=OFF",),), ("cp312",), ("linux-aarch64",), ("avx2",)]
    keys = {wheel_key(*(base[:i] + c + base[i + 1:])) for i, c in enumerate(changed)}
    assert len(keys) == len(changed) and key not in keys


def _fake_pip_wheel(calls, rc=0):
    """subprocess.run standing in for `pip wheel ... -w DIR`: writes a wheel into DIR."""
    def run(cmd, check=False, **kwargs):
        calls.append(cmd)
        if rc:
            raise subprocess.CalledProcessError(rc, cmd)
        out = cmd[cmd.index("-w") + 1]
        (Path(out) / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl").write_bytes(b"built %d" % len(calls))
        return subprocess.CompletedProcess(cmd, 0)
    return run


def test_wheel_is_built_into_the_cache_atomically(monkeypatch, tmp_path):
    """`pip wheel --no-deps SRC -w TMP` beside the entry, renamed into place; an entry another
    install finished first is kept (its wheel used, this build dropped); a failed build leaves
    nothing behind."""
    from llmdiff.references import llamacpp

    entry = tmp_path / "wheels" / "llama_cpp_python-0.3.36-cp311-linux-x86_64-0123"
    calls = []
    monkeypatch.setattr(llamacpp.subprocess, "run", _fake_pip_wheel(calls))
    wheel = llamacpp.build_wheel_into_cache("py", tmp_path / "src", entry, {}, quiet=True)
    assert wheel == entry / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl" and wheel.read_bytes() == b"built 1"
    assert calls[0][:6] == ["py", "-m", "pip", "wheel", "-q", "--no-deps"] and str(tmp_path / "src") in calls[0]
    assert llamacpp.cached_wheel(entry) == wheel
    again = llamacpp.build_wheel_into_cache("py", tmp_path / "src", entry, {}, quiet=True)   # lost a race
    assert again == wheel and wheel.read_bytes() == b"built 1" and len(calls) == 2
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]   # no temporary directory left
    other = entry.parent / "other"
    monkeypatch.setattr(llamacpp.subprocess, "run", _fake_pip_wheel(calls, rc=1))
    with pytest.raises(subprocess.CalledProcessError):
        llamacpp.build_wheel_into_cache("py", tmp_path / "src", other, {}, quiet=True)
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name] and llamacpp.cached_wheel(other) is None


@needs_llamacpp
def test_llama_cpp_python_installed_from_the_wheel_cache():
    """The venv's llama-cpp-python is the wheel in the cache entry this machine's key names (pip's
    direct_url.json), and that wheel is still there for the next install."""
    import json
    import sysconfig
    from urllib.parse import unquote, urlparse

    from llmdiff.references.llamacpp import CMAKE_ARGS, LLAMA_CPP_PYTHON_VERSION, _cpu_signature, wheel_key

    out = subprocess.run([venv_python("llamacpp"), "-c", "import importlib.metadata as m;"
                          " print(m.distribution('llama_cpp_python').read_text('direct_url.json'))"],
                         capture_output=True, text=True, check=True).stdout
    wheel = Path(unquote(urlparse(json.loads(out)["url"]).path))
    key = wheel_key(LLAMA_CPP_PYTHON_VERSION, CMAKE_ARGS, f"cp{sys.version_info.major}{sys.version_info.minor}",
                    sysconfig.get_platform(), _cpu_signature())
    assert wheel.suffix == ".whl" and wheel.parent.name == key, f"{wheel} is not {key}'s wheel: {INSTALL}"
    assert wheel.is_file()


# --- llama.cpp itself ---------------------------------------------------------------------------

def test_missing_extra_is_one_line(monkeypatch):
    """Without llama-cpp-python the adapter says how to install it, and nothing else."""
    import sys

    from llmdiff.job import Job, WeightsSource
    from llmdiff.references.base import MissingExtra
    from llmdiff.references.llamacpp import LlamaCppReference

    monkeypatch.setitem(sys.modules, "llama_cpp", None)   # `import llama_cpp` raises ImportError
    job = Job(spec=get_spec("gemma-7b", tiny=True).to_dict(), tokens=[[2, 5]], weights=WeightsSource(seed=0))
    with pytest.raises(MissingExtra) as e:
        LlamaCppReference(job)
    assert str(e.value) == f"implementation 'llamacpp' needs the llamacpp extra: {INSTALL}"


def _convert(tmp_path, model):
    """llama.cpp's converter (in the llamacpp venv) on a tiny checkpoint of `model`."""
    from llmdiff import weights

    spec = get_spec(model, tiny=True)
    hf = weights.write_hf_checkpoint(tmp_path / "hf", spec, weights.random_weights(spec))
    out = tmp_path / "out" / "model-f32.gguf"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import worker; worker._map_source_tree(sys.argv[2]);"
            "from pathlib import Path; from llmdiff.references.llamacpp import convert; from llmdiff.spec import get_spec;"
            "convert(sys.argv[3], Path(sys.argv[4]), 'float32', get_spec(sys.argv[5], tiny=True))")
    import llmdiff
    import llmdiff.references

    subprocess.run([venv_python("llamacpp"), "-c", code, os.path.dirname(llmdiff.__file__),
                    list(llmdiff.references.__path__)[0], str(hf), str(out), model], check=True)
    return out


@needs_llamacpp
def test_converter_gguf_audits_clean(tmp_path):
    """The GGUF llama.cpp's converter writes for tiny Gemma 2 (soft-caps, a window on every
    other layer) says what the spec says, as llama.cpp reads it."""
    from llmdiff.audit import audit

    result = audit(_convert(tmp_path, "gemma-2-2b"))   # the spec detected from the metadata
    assert result.report["model"] == "gemma-2-2b" and result, result.summary()


@needs_llamacpp
@pytest.mark.slow
def test_converter_drops_mistral_sliding_window(tmp_path):
    """Mistral converts as llama.cpp's `llama` architecture: no window in the GGUF, none in the
    graph (src/models/llama.cpp builds a full causal mask). The audit names it."""
    from llmdiff.audit import audit

    result = audit(_convert(tmp_path, "mistral-7b-v0.1"), "mistral-7b-v0.1")
    assert [(f["code"], f["where"]) for f in result.findings] == [
        ("LD708", "gguf:llama.attention.sliding_window_pattern")]


def _compare(monkeypatch, tmp_path, model, flash_attn, dtypes=("float32",)):
    import llmdiff
    from llmdiff.references.llamacpp import FLASH_ATTN_ENV

    monkeypatch.setenv(FLASH_ATTN_ENV, flash_attn)
    result = llmdiff.compare(model, ["llamacpp"], tiny=True, dtypes=list(dtypes), diagnose=False,
                             workdir=str(tmp_path / "work"))
    return result.report


def _points(run):
    return {p["name"]: p for p in run["points"]}


@needs_llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen3-0.6b", "qwen2.5-0.5b"])
def test_float32_at_parity_without_flash_attention(monkeypatch, tmp_path, model):
    """SwiGLU models, F32 GGUF, F32 KV cache, flash attention off: every point at parity."""
    report = _compare(monkeypatch, tmp_path, model, "off")
    run = run_by_candidate(report, "llamacpp", "float32")
    assert run["verdict"] == "parity", run["first_divergence"]
    assert run["missing_points"] == []
    assert [p["name"] for p in run["points"]] == capture_points(get_spec(model, tiny=True))
    assert _points(run)["logits"]["rel_l2"] <= 2e-6


@needs_llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma-2-2b", "gemma-3-1b"])
def test_gemma_2_and_3_are_fully_explained_by_the_gelu_table(monkeypatch, tmp_path, model):
    """Gemma 2/3 on llama.cpp (flash attention off): soft-caps, sliding windows (the prompts go
    past the tiny windows), Gemma 3's q/k norms and local RoPE base all agree with the oracle;
    the one divergence is GELU's F16 table (LD302) at the first MLP, and with it on the oracle
    no point is left divergent."""
    import llmdiff
    from llmdiff.references.llamacpp import FLASH_ATTN_ENV

    monkeypatch.setenv(FLASH_ATTN_ENV, "off")
    report = llmdiff.compare(model, ["llamacpp"], tiny=True, dtypes=["float32"],
                             workdir=str(tmp_path / "work")).report
    run = run_by_candidate(report, "llamacpp", "float32")
    assert run["missing_points"] == [] and run["first_divergence"] == "L0.mlp_act"
    assert max(len(p) for p in report["tokens"]["ids"]) > get_spec(model, tiny=True).sliding_window
    (f,) = report["findings"]
    assert (f["code"], f["where"], f["confirmed"]) == ("LD302", "L0.mlp_act", True)
    assert f["evidence"]["divergent_points"]["after"] == 0 < f["evidence"]["divergent_points"]["before"]


@needs_llamacpp
@pytest.mark.slow
def test_flash_attention_rounds_k_and_v_to_f16(monkeypatch, tmp_path):
    """llama.cpp's default (flash attention auto: on, on the CPU) casts an F32 KV cache's K and V
    to F16 (src/llama-graph.cpp, build_attn_mha): the first divergence is the attention output."""
    run = run_by_candidate(_compare(monkeypatch, tmp_path, "llama-3.1-8b", "auto"), "llamacpp", "float32")
    points = _points(run)
    assert run["first_divergence"] == "L0.attn_out"
    assert all(points[f"L0.{p}"]["verdict"] == "parity" for p in ("attn_norm", "q", "k", "v"))
    assert 1e-4 < points["L0.attn_out"]["rel_l2"] < 2e-3       # F16's 2^-11, not a wrong formula


@needs_llamacpp
@pytest.mark.slow
def test_gelu_is_an_f16_table_lookup(monkeypatch, tmp_path):
    """Gemma's GeGLU on llama.cpp's CPU backend: GELU read from a 65536-entry F16 table at the
    F16 rounding of its input (ggml/src/ggml-cpu/vec.h, GGML_GELU_FP16, ggml_vec_geglu_f32).
    Everything before it is at parity; mlp_act is that table to float32 rounding."""
    from llmdiff import safetensors_file

    run = run_by_candidate(_compare(monkeypatch, tmp_path, "gemma-7b", "off"), "llamacpp", "float32")
    points = _points(run)
    assert run["first_divergence"] == "L0.mlp_act"
    assert points["L0.mlp_up"]["verdict"] == "parity" and points["embed"]["max_abs"] == 0.0
    cap = safetensors_file.load(str(tmp_path / "work" / "llamacpp-float32.safetensors"))
    gate, up = cap["L0.mlp_gate"].astype(np.float64), cap["L0.mlp_up"].astype(np.float64)

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))

    table = gelu(gate.astype(np.float32).astype(np.float16).astype(np.float64)).astype(np.float16)
    emulated = np.where(gate <= -10, 0.0, np.where(gate >= 10, gate, table.astype(np.float64))) * up
    act = cap["L0.mlp_act"].astype(np.float64)

    def rel(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert rel(act, emulated) < 3e-6 < 1e-4 < rel(act, gelu(gate) * up)


def test_oracle_gelu_f16_table_is_ggmls():
    """The oracle's `gelu="f16_table"` (LD302's knob) is ggml's CPU GELU: 0 at x <= -10, x at
    x >= 10, else the float32 tanh GELU of x's float16 rounding, rounded to float16."""
    import jax.numpy as jnp

    from llmdiff.references.gemma import gelu_f16_table

    x = np.concatenate([np.random.default_rng(0).normal(0, 3, 20_000), [-10.0, -10.5, 10.0, 12.5]]).astype(np.float32)
    got = np.asarray(gelu_f16_table(jnp.asarray(x)), np.float64)
    h = x.astype(np.float16).astype(np.float64)
    table = (0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))).astype(np.float16)
    want = np.where(x <= -10, 0.0, np.where(x >= 10, x, table.astype(np.float64)))
    assert list(got[-4:]) == [0.0, 0.0, 10.0, 12.5]
    assert np.all(got[:-4].astype(np.float32).astype(np.float16) == got[:-4].astype(np.float16))  # float16 values
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-6      # float64's table: a tail entry apart
    exact = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x.astype(np.float64) ** 3)))
    assert 1e-4 < np.linalg.norm(got - exact) / np.linalg.norm(exact) < 1e-3   # float16's 2^-11, not float32's


@needs_llamacpp
@pytest.mark.slow   # one compare with diagnosis (~150 s on 2 shared cores)
def test_default_flash_attention_gemma_is_ld511_and_ld302(monkeypatch, tmp_path):
    """llama.cpp as it runs by default (flash attention on, the F16 GELU table), gemma-7b tiny in
    float32, fully explained: LD511 kv-rounded-to-f16 at L0.attn_out with llama.cpp's CPU kernel
    (`kv_f16_short`: the 42-token prompt takes ggml's one-chunk kernel, F16 q and accumulator;
    the 192-token one the tiled kernel, K and V alone at F16), then LD302 at L0.mlp_act, and no
    divergent point left after both."""
    import llmdiff
    from llmdiff.references.llamacpp import FLASH_ATTN_ENV

    monkeypatch.setenv(FLASH_ATTN_ENV, "auto")
    report = llmdiff.compare("gemma-7b", ["llamacpp"], tiny=True, dtypes=["float32"],
                             workdir=str(tmp_path / "work")).report
    assert run_by_candidate(report, "llamacpp", "float32")["first_divergence"] == "L0.attn_out"
    found = {f["code"]: f for f in report["findings"]}
    assert sorted(found) == ["LD302", "LD511"], report["findings"]
    kv, gelu = found["LD511"], found["LD302"]
    assert (kv["where"], kv["confirmed"], gelu["where"], gelu["confirmed"]) == ("L0.attn_out", True, "L0.mlp_act", True)
    assert kv["evidence"]["knob"] == {"kv_f16": True, "kv_f16_short": True}
    assert kv["evidence"]["before"]["floor_ratio"] > 100 and kv["evidence"]["after"]["floor_ratio"] <= 1
    assert gelu["evidence"]["divergent_points"]["after"] == 0


def test_oracle_one_chunk_flash_attention_is_ggmls():
    """The oracle's `kv_f16_short` kernel (LD511's llama.cpp form) is ggml's CPU one-chunk flash
    attention with an F16 V: keys in order, running max and sum in float32, the V accumulator
    rounded to float16 after every rescale and multiply-add; here against that loop written out
    in numpy, and against the exact softmax . v at float16's distance, not float32's."""
    import jax.numpy as jnp

    from llmdiff.references.gemma import _ggml_one_chunk

    rng = np.random.default_rng(0)
    T, H = 9, 8
    logits = rng.normal(0, 2, (1, T, 1, 1, T)).astype(np.float32)
    v = rng.normal(0, 1, (1, T, 1, H)).astype(np.float16).astype(np.float32)
    visible = np.tril(np.ones((T, T), bool))[None]
    got = np.asarray(_ggml_one_chunk(jnp.asarray(np.where(visible[:, :, None, None], logits, -3e38)),
                                     jnp.asarray(v), jnp.asarray(visible)))[0, :, 0, 0]
    f16 = lambda x: np.float32(x).astype(np.float16).astype(np.float32)
    want, exact = np.zeros((T, H), np.float32), np.zeros((T, H))
    for t in range(T):
        M, S, acc = -np.inf, np.float32(0), np.zeros(H, np.float32)
        for j in range(t + 1):
            s = logits[0, t, 0, 0, j]
            if s > M:
                ms, vs, M = np.exp(np.float32(M - s)), np.float32(1), s
                acc = f16(acc * ms)
            else:
                ms, vs = np.float32(1), np.exp(np.float32(s - M))
            acc = f16(acc + v[0, j, 0] * vs)
            S = np.float32(S * ms + vs)
        want[t] = acc / S
        p = np.exp(logits[0, t, 0, 0, :t + 1].astype(np.float64))
        exact[t] = (p / p.sum()) @ v[0, :t + 1, 0].astype(np.float64)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()     # the same loop, to float32 rounding
    assert 1e-5 < np.linalg.norm(got - exact) / np.linalg.norm(exact) < 3e-3


# --- --quant q8_0 ---------------------------------------------------------------------------

def test_q8_0_weight_round_trip_is_the_converters():
    """llmdiff.quant rounds a tensor bit for bit as gguf.quants (the converter's quantiser) does,
    along the axis the GGUF blocks it on (the HF tensor's last: a Linear's input features)."""
    import gguf

    from llmdiff import quant

    rng = np.random.default_rng(0)
    a = (rng.standard_normal((6, 96)) * np.logspace(-3, 1, 96)).astype(np.float32)
    a[1, :32] = 0.0                                       # a zero block: scale 0
    a[2, 32:64] = np.concatenate([[127.0], 0.5 + np.arange(-15, 16)])   # scale 1: exact halves, roundf's ties
    want = gguf.quants.dequantize(gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                                  gguf.GGMLQuantizationType.Q8_0).reshape(a.shape)
    assert np.array_equal(quant.q8_0_round_trip_rows(a), want)
    # canonical o (N, H, D) is HF's o_proj (D, N*H) transposed: blocks along N*H
    N, H, D = 2, 32, 8
    o = rng.standard_normal((N, H, D)).astype(np.float32)
    hf = o.reshape(N * H, D).T
    got = quant.round_trip("L3.o", o, "q8_0").reshape(N * H, D).T
    assert np.array_equal(got, quant.q8_0_round_trip_rows(hf))
    assert not np.array_equal(got, hf)                                  # it did round
    norm = rng.standard_normal(64).astype(np.float32)
    assert quant.round_trip("L0.attn_norm", norm, "q8_0") is norm         # norms stay F32


def test_oracle_matmul_input_rounding_is_ggml_x86s():
    """`Precision.matmul_q8_0`'s rounding is ggml-cpu/arch/x86/quants.c `quantize_row_q8_0`
    (AVX2): id = 127 / max|x| (not 1 / d), _MM_ROUND_NEAREST (half to even), d stored as f16; on
    a block built so that the other forms differ."""
    import jax.numpy as jnp

    from llmdiff.references import gemma

    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 127.0
    x[0, 1:6] = [0.5, 1.5, 2.5, -2.5, 3.7]               # ties: half-even gives 0, 2, 2, -2
    got = np.asarray(gemma.q8_0_round(jnp.asarray(x)))
    assert got[0, :5].tolist() == [127.0, 0.0, 2.0, 2.0, -2.0] and got[0, 5] == 4.0
    assert np.array_equal(np.asarray(gemma.q8_0_round(jnp.zeros((2, 64)))), np.zeros((2, 64)))
    odd = jnp.asarray(np.full((1, 48), 1.0 + 2.0 ** -12, np.float32))     # not a multiple of 32: F16
    assert np.all(np.asarray(gemma.q8_0_round(odd)) == 1.0)


@pytest.mark.parametrize("args, says", [
    (["--quant", "q8_0"], "--impl llamacpp"),                                       # the default impl, hf
    (["--quant", "q8_0", "--impl", "llamacpp", "--impl", "hf"], "not hf"),
    (["--quant", "q4_k", "--impl", "llamacpp"], "unknown quantisation 'q4_k'"),
    (["--quant", "q8_0", "--impl", "llamacpp", "--dtype", "bfloat16"], "float32"),
    (["--quant", "q8_0", "--impl", "llamacpp", "--dtype", "float32", "--dtype", "bfloat16"], "drop --dtype bfloat16"),
    (["--quant", "q8_0", "--impl", "llamacpp", "--grad"], "--grad"),
])
def test_quant_bad_combinations_are_one_line_errors_before_any_work(llmdiff_cli, tmp_path, args, says):
    work = tmp_path / "work"
    code, _, err, _ = llmdiff_cli("compare", "gemma-7b", "--tiny", "--workdir", str(work), *args)
    assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not work.exists()   # refused before the work directory was made


def _quant_compare(monkeypatch, tmp_path, model):
    import llmdiff
    from llmdiff.references.llamacpp import FLASH_ATTN_ENV

    monkeypatch.setenv(FLASH_ATTN_ENV, "off")
    return llmdiff.compare(model, ["llamacpp"], tiny=True, quant="q8_0", diagnose=False,
                           workdir=str(tmp_path / "work")).report


@needs_llamacpp
@pytest.mark.parametrize("model", [   # 9 s and 13 s here; llama's parity is also asserted below
    "gemma-7b", pytest.param("llama-3.1-8b", marks=pytest.mark.slow)])
def test_q8_0_at_parity_with_the_quantised_oracle(monkeypatch, tmp_path, model):
    """llama.cpp on its converter's Q8_0 GGUF against the oracle quantised the same way (weights
    round-tripped, matmul inputs rounded to Q8_0 blocks as ggml's CPU kernel does): every point
    within its noise floor, the floor being the quantised oracle's own float32-vs-float64 distance."""
    report = _quant_compare(monkeypatch, tmp_path, model)
    assert report["options"]["quant"] == "q8_0" and report["options"]["dtypes"] == ["float32"]
    run = run_by_candidate(report, "llamacpp", "float32")
    assert run["verdict"] == "parity", run["first_divergence"]
    assert run["missing_points"] == []
    details = next(i["details"] for i in report["implementations"] if i["name"] == "llamacpp")
    assert details["converter"].endswith("--outtype q8_0") and details["tensor_types"]["Q8_0"] > 0


@needs_llamacpp
@pytest.mark.slow   # 21 s here
def test_q8_0_judged_against_the_wrong_quantisation_diverges(monkeypatch, tmp_path):
    """The same llama.cpp Q8_0 captures against the oracle with Q8_0 weights but float matmul
    inputs (the weights-only round trip) diverges at the first projection, and against the float
    oracle at the embedding already (llama.cpp's token table is Q8_0): the check can fail."""
    from llmdiff import diagnose, diff
    from llmdiff.job import Job, RunId

    model = "llama-3.1-8b"
    report = _quant_compare(monkeypatch, tmp_path, model)
    assert run_by_candidate(report, "llamacpp", "float32")["verdict"] == "parity"
    work = tmp_path / "work"
    cand = diff.load_captures(str(work / "llamacpp-float32.safetensors"))
    job = Job.from_json((work / "job-oracle.json").read_text())
    points = capture_points(get_spec(model, tiny=True))
    for wrong, policy, first in ((job, {"matmul_q8_0": False}, "L0.q"), (job.with_(quant=None), {}, "embed")):
        lab = diagnose.OracleLab(wrong, work)
        ref, truth = lab.run_many([diagnose.Variant.of("float32", policy), diagnose.Variant.of("float64", policy, "float32")])
        run = diff.compare_captures(cand, ref, diff.noise_floors(ref, truth, "float32"), "float32", points)
        assert run["verdict"] == "divergence" and run["first_divergence"] == first, (wrong.quant, policy)


def test_a_gguf_quantised_otherwise_than_the_oracle_is_an_error():
    """The oracle's rounded set is checked against the tensors the converter wrote as Q8_0."""
    from llmdiff import convert
    from llmdiff.references.llamacpp import check_quantised_as_oracle

    spec = get_spec("llama-3.1-8b", tiny=True)
    names = ["token_embd.weight", "output.weight"] + [f"blk.{i}.{t}.weight" for i in range(spec.num_layers)
                                                      for t in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                                "ffn_gate", "ffn_up", "ffn_down")]
    assert len(names) == sum(len(s) > 1 for s in convert.canonical_shapes(spec).values())
    check_quantised_as_oracle({"Q8_0": names, "F32": ["output_norm.weight"]}, "q8_0", spec)   # as written
    with pytest.raises(RuntimeError, match=r"not for \['L1.down'\]"):
        check_quantised_as_oracle({"Q8_0": names[:-1], "F16": names[-1:]}, "q8_0", spec)
