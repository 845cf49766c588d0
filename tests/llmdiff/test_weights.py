import json

import ml_dtypes
import numpy as np
import pytest

from llmdiff import convert, weights
from llmdiff.spec import get_spec


def test_deterministic_per_tensor_name():
    small = get_spec("gemma-7b", tiny=True)
    a, b = weights.random_weights(small, seed=0), weights.random_weights(small, seed=0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = weights.random_weights(small, seed=1)
    assert not np.array_equal(a["L0.q"], c["L0.q"])


def test_values_are_bfloat16_numbers_with_realistic_scale():
    spec = get_spec("gemma-2b", tiny=True)
    w = weights.random_weights(spec)
    for name, a in w.items():
        assert np.array_equal(a, a.astype(ml_dtypes.bfloat16).astype(np.float32)), name
        if name.endswith("norm"):
            assert np.abs(a).max() > 0.1, name  # (1 + w) is not just 1
    assert 0.5 < np.std(w["embed"] * np.sqrt(spec.hidden_size)) < 2


def test_model_does_not_just_echo_its_input_token():
    """Random tied-embedding models tend to predict their input token; ours must not."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from llmdiff import inputs
    from llmdiff.references import gemma

    spec = get_spec("gemma-7b", tiny=True)
    params = jax.tree_util.tree_map(jnp.asarray, convert.unflatten(convert.to_deepmind(spec, weights.random_weights(spec))))
    tokens = np.array([inputs.synthetic_prompts(spec)[1]])
    logits = np.asarray(gemma.forward(params, jnp.asarray(tokens), spec, gemma.Precision())["logits"])
    echo = np.mean(logits.argmax(-1) == tokens)
    assert echo < 0.2, f"{echo:.0%} of positions predict their own input token"


def test_hf_config_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = get_spec("gemma-2b", tiny=True)
    path = weights.write_hf_checkpoint(tmp_path / "c", spec, weights.random_weights(spec))
    config = transformers.AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_key_value_heads, config.head_dim) == (384, 1, 48)
    assert config.hidden_act == "gelu_pytorch_tanh"
    assert json.loads((path / "config.json").read_text())["hidden_activation"] == "gelu_pytorch_tanh"
    back = weights.read_hf_checkpoint(path, spec)
    assert weights.weights_fingerprint(back) == weights.weights_fingerprint(weights.random_weights(spec))


@pytest.mark.parametrize("name", ["gemma-2-27b", "gemma-3-1b", "gemma-3-4b"])
def test_gemma2_gemma3_hf_config_loads_with_every_number(name, tmp_path):
    """HF's defaults differ from most models (window 4096, softcaps, scalar 256, no RoPE scaling):
    what transformers reads back must be the spec, not a default."""
    transformers = pytest.importorskip("transformers")
    spec = get_spec(name, tiny=True)
    path = weights.write_hf_checkpoint(tmp_path / "ckpt", spec, weights.random_weights(spec), "float32")
    config = transformers.AutoConfig.from_pretrained(path)
    assert type(config).__name__ == {"gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig"}[spec.family]
    assert config.sliding_window == spec.sliding_window
    assert config.layer_types == [{"local": "sliding_attention", "global": "full_attention"}[t]
                                  for t in spec.layer_types]
    assert config.query_pre_attn_scalar ** -0.5 == spec.query_scale
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (spec.attn_softcap, spec.final_softcap)
    assert config.vocab_size == (spec.hf_vocab_size or spec.vocab_size)
    assert config.hidden_activation == "gelu_pytorch_tanh"
    rope = getattr(config, "rope_parameters", None)
    if rope is not None and spec.family == "gemma3":  # transformers 5.x: RoPE per layer type
        assert rope["full_attention"]["rope_theta"] == spec.rope_base
        assert rope["sliding_attention"]["rope_theta"] == spec.rope_base_local
        assert rope["sliding_attention"]["rope_type"] == "default"
        if spec.rope_scale != 1:
            assert (rope["full_attention"]["rope_type"], rope["full_attention"]["factor"]) == ("linear", spec.rope_scale)
        else:
            assert rope["full_attention"]["rope_type"] == "default"
    # and the checkpoint reads back to the same canonical weights
    again = weights.read_hf_checkpoint(path, spec)
    assert weights.weights_fingerprint(again) == weights.weights_fingerprint(weights.random_weights(spec))


def test_generator_gives_the_same_bits_in_numpy_torch_and_jax():
    """Workers make full-size weights on their own device with their own framework; in JAX
    with its 64-bit types off (DeepMind's gemma) and on (the oracle)."""
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    spec = get_spec("gemma-2-2b", tiny=True)  # zero padding rows in its embedding
    shapes = convert.canonical_shapes(spec)
    for name in ("embed", "L0.q", "L1.down", "L0.attn_norm", "final_norm"):
        ref = weights.generate_numpy(spec, name, shapes[name])
        assert np.array_equal(ref, weights.generate_torch(spec, name, shapes[name]).numpy()), name
        for x64 in (False, True):
            with jax.enable_x64(x64):
                made = weights.generate_jax(spec, name, shapes[name])
                assert made.dtype == np.float32 and np.array_equal(ref, np.asarray(made)), (name, x64)
                half = weights.generate_jax(spec, name, shapes[name], dtype="bfloat16")
                assert np.array_equal(ref, np.asarray(half.astype(np.float32))), (name, x64)
        assert np.array_equal(ref.astype(np.float64),
                              weights.generate_torch(spec, name, shapes[name], dtype=torch.float64).numpy()), name


def test_generator_across_chunks_and_its_distribution(monkeypatch):
    spec = get_spec("gemma-7b", tiny=True)
    shape = convert.canonical_shapes(spec)["embed"]
    whole = weights.generate_numpy(spec, "embed", shape)
    monkeypatch.setattr(weights, "CHUNK", 1000)  # the same bits whatever the step
    monkeypatch.setattr(weights, "_HOST_BLOCK", 1000)  # the host's threaded blocks too
    assert np.array_equal(whole, weights.generate_numpy(spec, "embed", shape))
    torch = pytest.importorskip("torch")
    assert np.array_equal(whole, weights.generate_torch(spec, "embed", shape).numpy())
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    assert whole.size % 1000   # JAX's last chunk runs past the end and is cut
    assert np.array_equal(whole, np.asarray(weights.generate_jax(spec, "embed", shape)))
    std = weights.tensor_std(spec, "embed")
    assert abs(whole.std() / std - 1) < 0.02 and np.abs(whole).max() <= std * 3 ** 0.5 * 1.01
    assert abs(np.corrcoef(whole.ravel()[:-1], whole.ravel()[1:])[0, 1]) < 0.01  # neighbours independent


def test_host_generator_is_the_int64_formula_rounded_as_ml_dtypes_rounds(monkeypatch):
    """The host's uint32 steps (threads, scratch arrays, bfloat16 rounding in float32's bits)
    against the generator's definition: `_odd_uniform` in int64, times c, then ml_dtypes'
    round to nearest even; on a million values, ties to even among them."""
    spec = get_spec("gemma-7b")
    name, size = "L0.gate", (1 << 20) + 3
    monkeypatch.setattr(weights, "_HOST_BLOCK", (1 << 15) + 1)   # uneven steps, several threads
    made = weights.generate_numpy(spec, name, (size,))
    exact = weights._odd_uniform(np.arange(size, dtype=np.int64), weights._key(0, name)).astype(np.float32) \
        * weights._unit(spec, name)
    assert np.count_nonzero((exact.view(np.uint32) & 0xFFFF) == 0x8000) > 0   # ties are rounded here
    assert np.array_equal(made, weights.to_bf16_values(exact))
    assert made.view(np.uint32).tobytes() == weights.to_bf16_values(exact).view(np.uint32).tobytes()


def test_generated_fingerprint_depends_on_seed_and_model():
    a = get_spec("gemma-7b")
    assert weights.generated_fingerprint(a, 0) == weights.generated_fingerprint(a, 0)
    assert weights.generated_fingerprint(a, 0) != weights.generated_fingerprint(a, 1)
    assert weights.generated_fingerprint(a, 0) != weights.generated_fingerprint(get_spec("gemma-2b"), 0)


# --- an HF checkpoint directory, tensor by tensor ------------------------------------------

# One tiny model of every family: its HF layout (fused Phi-3 projections, Qwen2 biases, q/k
# norms, four norms, HF's smaller Gemma 2 table, untied heads).
FAMILY_MODELS = ["gemma-7b", "gemma-2-2b", "gemma-3-1b", "llama-3.1-8b", "qwen2.5-0.5b", "qwen3-0.6b",
                 "mistral-7b-v0.1", "phi-3-mini-4k-instruct"]


def _joined(blocks) -> dict:
    parts: dict = {}
    for name, block, non_finite, _digest in blocks:
        assert block.dtype == np.float32 and block.flags.c_contiguous and non_finite == 0
        parts.setdefault(name, []).append(block)
    return {n: np.concatenate(p) for n, p in parts.items()}


def _assert_same_bits(got: dict, want: dict) -> None:
    assert list(got) == list(want) or sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == np.float32 and got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name


def test_family_models_cover_every_family():
    from llmdiff import hf_format

    assert {get_spec(n, tiny=True).family for n in FAMILY_MODELS} == set(hf_format.ARCHITECTURES)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_checkpoint_tensor_by_tensor_is_read_hf_checkpoint_bit_for_bit(name, tmp_path):
    """Each canonical tensor read alone, the parent's blocks, and what a worker gets from
    either source are the whole-set read's values; the streamed fingerprint is the whole set's."""
    from llmdiff.job import WeightsSource

    spec = get_spec(name, tiny=True)
    path = weights.write_hf_checkpoint(tmp_path / "c", spec, weights.random_weights(spec))
    whole = weights.read_hf_checkpoint(path, spec)
    checkpoint = weights.HFCheckpoint(path, spec)
    assert checkpoint.names == sorted(whole)
    alone = {}
    for n in reversed(checkpoint.names):          # one at a time, out of order
        alone.update(checkpoint.read([n]))
    _assert_same_bits(alone, whole)
    _assert_same_bits(_joined(checkpoint.blocks(block_bytes=1000)), whole)   # several blocks per tensor
    fingerprint = weights.weights_fingerprint(whole)
    assert weights.checked_fingerprint(checkpoint.blocks(), path) == fingerprint
    assert weights.checked_fingerprint(checkpoint.blocks(block_bytes=1000), path) == \
        weights.weights_fingerprint(whole, block_bytes=1000) != fingerprint
    layer = convert.layer_names(spec, 1)
    from_dir = weights.canonical_tensors(spec, WeightsSource(hf_dir=str(path), from_hf=True), layer)
    _assert_same_bits(from_dir, {n: whole[n] for n in layer})
    weights.save_canonical(tmp_path / "canonical.safetensors", whole)
    from_file = weights.canonical_tensors(spec, WeightsSource(canonical=str(tmp_path / "canonical.safetensors")))
    _assert_same_bits(from_file, whole)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_checkpoint_read_on_the_device_is_read_bit_for_bit(name, tmp_path):
    """`read` with `put` (what the oracle does on a GPU: the HF tensors onto the device as
    stored, each once, transposed and widened there) gives the host's values, bit for bit, every
    bfloat16 finite value among them (subnormals, signed zeros); on JAX's default device (a GPU
    where there is one)."""
    jnp = pytest.importorskip("jax.numpy")
    from llmdiff import safetensors_file

    spec = get_spec(name, tiny=True)
    path = weights.write_hf_checkpoint(tmp_path / "c", spec, weights.random_weights(spec))
    f = path / "model.safetensors"
    tensors = {k: np.array(v) for k, v in safetensors_file.load(f).items()}
    embed = tensors["model.embed_tokens.weight"]
    bits = np.arange(embed.size, dtype=np.uint32).astype(np.uint16)
    bits[(bits & 0x7F80) == 0x7F80] = 0x0001   # no NaN or Inf: the check refuses those first
    tensors["model.embed_tokens.weight"] = bits.view(ml_dtypes.bfloat16).reshape(embed.shape)
    safetensors_file.save(f, tensors)
    checkpoint = weights.HFCheckpoint(path, spec)
    put = []
    on_device = checkpoint.read(checkpoint.names, put=lambda a: put.append(a.shape) or jnp.asarray(a))
    _assert_same_bits({n: np.asarray(a) for n, a in on_device.items()}, checkpoint.read(checkpoint.names))
    assert all(a.dtype == jnp.float32 for a in on_device.values())
    assert sorted(put) == sorted(t.shape for t in tensors.values())   # each HF tensor once
    alone = checkpoint.read(["final_norm"], put=lambda a: put.append(a.shape) or jnp.asarray(a))
    assert put[-1] == (spec.hidden_size,) and len(put) == len(tensors) + 1   # the embedding not put for it
    _assert_same_bits({"final_norm": np.asarray(alone["final_norm"])}, checkpoint.read(["final_norm"]))


def test_fingerprint_is_a_tree_of_row_block_digests():
    """"v2-" and the first 16 hex digits of sha256 over "v2-", then each sorted name between NULs
    followed by the sha256 of each of its blocks of whole rows (float32 bytes, BLOCK_BYTES a
    block): its definition, so that reports of the same weights stay comparable from now on. The
    blocks and the names are the tree's: the same bytes cut otherwise, or renamed, differ."""
    import hashlib

    sha = lambda b: hashlib.sha256(b).digest()   # noqa: E731
    rows = weights.BLOCK_BYTES // 12             # a block of `b` below: this many rows of 3 float32
    b = np.arange(3 * (rows + 1), dtype=np.float32).reshape(3, rows + 1).T   # a transposed view
    canon = {"b": b, "a": np.array([1.5], np.float32), "c": np.float32(2.0).reshape(()), "d": np.zeros((0, 4), np.float32)}
    want = hashlib.sha256(b"v2-" + b"\0a\0" + sha(np.float32(1.5).tobytes())
                          + b"\0b\0" + sha(np.ascontiguousarray(b[:rows]).tobytes()) + sha(np.ascontiguousarray(b[rows:]).tobytes())
                          + b"\0c\0" + sha(np.float32(2.0).tobytes()) + b"\0d\0" + sha(b""))
    assert weights.weights_fingerprint(canon) == "v2-" + want.hexdigest()[:16]
    blocks = [(n, blk, 0, weights._digest(blk)) for n in sorted(canon)
              for blk in weights._row_blocks(np.ascontiguousarray(canon[n]), weights.BLOCK_BYTES)]
    assert len(blocks) == 5 and weights.checked_fingerprint(blocks, "x") == weights.weights_fingerprint(canon)
    assert weights.weights_fingerprint({"a": canon["a"], "bb": b}) != weights.weights_fingerprint({"a": canon["a"], "b": b})
    assert weights.weights_fingerprint({"b": b}, block_bytes=1 << 30) != weights.weights_fingerprint({"b": b})


def test_sharded_float32_checkpoint_with_an_untied_head_of_a_tied_model(tmp_path):
    """Two shards and their index, float32 (the tensors are then the files' own bytes), and an
    `lm_head.weight` a tied model's checkpoint may carry."""
    from llmdiff import checkpoint_files, safetensors_file

    spec = get_spec("gemma-7b", tiny=True)
    canon = weights.random_weights(spec)
    canon["lm_head"] = canon["embed"] * 2
    path = weights.write_hf_checkpoint(tmp_path / "c", spec, canon, dtype="float32")
    tensors = safetensors_file.load(path / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, part in shards.items():
        safetensors_file.save(path / fname, {n: np.array(tensors[n]) for n in part})
    (path / "model.safetensors").unlink()
    (path / checkpoint_files.INDEX).write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}))
    whole = weights.read_hf_checkpoint(path, spec)
    assert "lm_head" in whole
    checkpoint = weights.HFCheckpoint(path, spec)
    _assert_same_bits(checkpoint.read(checkpoint.names), whole)
    assert weights.checked_fingerprint(checkpoint.blocks(block_bytes=4096), path) == \
        weights.weights_fingerprint(whole, block_bytes=4096)


def _error(call) -> str:
    from llmdiff.errors import WeightsError

    with pytest.raises(WeightsError) as e:
        call()
    return str(e.value)


def _rewrite(path, change) -> None:
    from llmdiff import safetensors_file

    f = path / "model.safetensors"
    tensors = {k: np.array(v) for k, v in safetensors_file.load(f).items()}
    change(tensors)
    safetensors_file.save(f, tensors)


@pytest.mark.parametrize("case", ["missing", "shape"])
def test_checkpoint_errors_are_the_whole_reads_before_any_value_is_read(tmp_path, case):
    spec = get_spec("gemma-7b", tiny=True)
    path = weights.write_hf_checkpoint(tmp_path / "c", spec, weights.random_weights(spec))
    name = "model.layers.1.mlp.up_proj.weight"
    if case == "missing":
        _rewrite(path, lambda t: t.pop(name))
    else:
        _rewrite(path, lambda t: t.update({name: t[name][:-1]}))
    line = _error(lambda: weights.HFCheckpoint(path, spec))
    assert line == _error(lambda: weights.read_hf_checkpoint(path, spec))
    assert (f"missing tensor {name!r}" if case == "missing" else f"shape mismatch: {name} has shape (767, 96)") in line


def test_non_finite_weights_are_refused_naming_the_first_tensor_and_its_count(tmp_path):
    """NaN in two tensors, one of them over several blocks: the error of `refuse_non_finite` on
    the whole set (the first tensor in sorted order, every bad value of it counted)."""
    spec = get_spec("gemma-7b", tiny=True)
    path = weights.write_hf_checkpoint(tmp_path / "c", spec, weights.random_weights(spec))

    def poison(t):
        down = t["model.layers.0.mlp.down_proj.weight"]   # canonical L0.down: (F, D), its transpose
        down[0, :5] = np.nan                               # column 0 of L0.down: rows 0..4, one per block below
        down[3, -1] = np.inf
        t["model.embed_tokens.weight"][7, 7] = np.nan
    _rewrite(path, poison)
    want = _error(lambda: weights.refuse_non_finite(weights.read_hf_checkpoint(path, spec), str(path)))
    assert "tensor L0.down holds 6 NaN/Inf values" in want
    checkpoint = weights.HFCheckpoint(path, spec)
    got = _error(lambda: weights.checked_fingerprint(checkpoint.blocks(block_bytes=96 * 4), str(path)))
    assert got == want


def test_blocks_stay_near_block_bytes(tmp_path):
    spec = get_spec("gemma-7b", tiny=True)
    path = weights.write_hf_checkpoint(tmp_path / "c", spec, weights.random_weights(spec))
    shapes, sizes = convert.canonical_shapes(spec), {}
    for name, block, _, _ in weights.HFCheckpoint(path, spec).blocks(block_bytes=8192):
        sizes.setdefault(name, []).append(block.nbytes)
    for name, got in sizes.items():   # whole rows: one row a block where a row is larger
        row = int(np.prod(shapes[name][1:])) * 4
        assert max(got) <= max(8192, row) and sum(got) == row * shapes[name][0], name
    rows, width = shapes["embed"]
    assert len(sizes["embed"]) == -(-rows // (8192 // (width * 4))) > 1   # as many whole rows as fit


def test_a_tensor_the_checkpoint_lacks_is_one_line(tmp_path):
    spec = get_spec("gemma-7b", tiny=True)  # tied: no lm_head
    path = weights.write_hf_checkpoint(tmp_path / "c", spec, weights.random_weights(spec))
    checkpoint = weights.HFCheckpoint(path, spec)
    for name in ("lm_head", "L9.q", "Lx.q"):
        assert f"no canonical tensor {name!r} for gemma-7b" in _error(lambda: checkpoint.read(["L0.q", name]))


def test_transposed_views_convert_square_by_square_to_the_same_bits():
    """The tiled copy of a transposed view (several tiles each way, ragged edges, a leading
    heads axis as q's and o's views have) is `np.ascontiguousarray(v, np.float32)`."""
    rng = np.random.default_rng(0)
    hf = (rng.standard_normal((300, 517), dtype=np.float32) * 3).astype(ml_dtypes.bfloat16)
    hf[5, 7] = np.nan
    views = [hf.T, hf.T[100:400], hf.reshape(3, 100, 517).transpose(0, 2, 1), hf.T.reshape(11, 47, 300),
             hf.astype(np.float32).T, hf]
    for v in views:
        got = weights._float32(v)
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == v.shape
        assert got.tobytes() == np.ascontiguousarray(v, np.float32).tobytes()


def test_every_bfloat16_value_converts_to_ml_dtypes_float32_bits():
    """The shifted uint16 path is ml_dtypes' cast for all 65536 bit patterns (NaN payloads,
    infinities, subnormals, signed zeros), contiguous and as a transposed view."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    hf = bits.view(ml_dtypes.bfloat16)
    for v in (hf, hf.T, hf.reshape(4, 64, 256).transpose(0, 2, 1)):
        got = weights._float32(v)
        assert got.view(np.uint32).tobytes() == np.ascontiguousarray(v, np.float32).view(np.uint32).tobytes()


def test_a_tensor_converted_in_pieces_on_several_threads_is_the_same_bits(monkeypatch):
    monkeypatch.setattr(weights, "_PIECE_BYTES", 4096)
    monkeypatch.setattr(weights, "_threads", lambda: 3)
    rng = np.random.default_rng(1)
    hf = rng.standard_normal((300, 517), dtype=np.float32).astype(ml_dtypes.bfloat16)
    for v in (hf.T, hf, hf.astype(np.float16).T, hf.reshape(3, 100, 517).transpose(0, 2, 1)):
        got = weights._float32(v, parallel=True)
        assert got.flags.c_contiguous and got.tobytes() == np.ascontiguousarray(v, np.float32).tobytes()


def test_converted_tensors_start_on_a_64_byte_boundary():
    """So that a CPU worker's device array aliases the converted tensor instead of copying it."""
    hf = np.ones((3, 5, 7), ml_dtypes.bfloat16)
    for v in (hf, hf.transpose(0, 2, 1), hf[0, 0], hf[0, 0, 0]):
        got = weights._float32(v)
        assert got.ctypes.data % 64 == 0 and got.shape == v.shape and got.dtype == np.float32
        assert got.flags.c_contiguous and got.flags.writeable and np.all(got == 1)
