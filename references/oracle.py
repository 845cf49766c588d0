"""Adapter for llmdiff's own JAX oracle (`references/gemma.py`)."""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

# XLA may keep a value in float32 where the program rounds it to bfloat16 and converts it
# back ("excess precision"); then the oracle's bfloat16 run would not round where every
# bfloat16 implementation rounds (measured: 26% of L0.attn_norm off by one bf16 ulp).
# Read when the backend starts, so it must be set before the first computation.
# Likewise LLVM contracts a multiply and an add across two canonical points into one fused
# multiply-add (measured: embed * scale + attn_out at L0.resid_mid, 445 of 2304 values one ulp
# off in float32); optimisation level 0 keeps each op's own rounding. CPU code generation only.
for flag in ("--xla_allow_excess_precision=false", "--xla_backend_optimization_level=0"):
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

from llmdiff.references.base import Reference


class OracleReference(Reference):
    name = "oracle"
    dtypes = ("float32", "bfloat16", "float64", "autocast-bfloat16", "autocast-float16")
    has_bare_forward = True
    makes_weights = True

    def versions(self):
        import jax

        return {"jax": jax.__version__}

    def load(self, request):
        import jax

        dtype, constants_dtype = request.dtype, request.constants_dtype
        self.top, self._layers = None, None  # the last run's weights leave the device first
        kept, self._kept = getattr(self, "_kept", None), None   # but for a float32 run's (`_reuse`)
        # Some of them are held in reference cycles, which only the collector frees (measured on
        # the CPU: the embedding of a float32 run still resident through the next run's load).
        import gc

        gc.collect()

        jax.config.update("jax_enable_x64", True)
        # Compiled steps are kept across runs (a full-size model's first compile takes tens of
        # seconds on a GPU); LLMDIFF_JAX_CACHE=off turns it off.
        from llmdiff.runner import cache_dir

        cache = os.environ.get("LLMDIFF_JAX_CACHE") or cache_dir("jax")
        if cache != "off" and not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", cache)
            # Every step, however quick to compile: the counterfactual runs of a diagnosis and a
            # CI job's repeated runs compile the same small steps again and again otherwise.
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
            # A bounded cache is a locked one: without a size JAX reads and writes entries with
            # no lock and no atomic rename, so a worker reading an entry another process is
            # writing (two compares at once; a selftest next to a test run) deserialises half an
            # executable and dies (measured here: signal 6 and 11 in 4414 of 7950 selftest runs).
            # With a size, every get and put holds `.lockfile` (filelock) and old entries go first.
            jax.config.update("jax_compilation_cache_max_size", 4 << 30)
        # XLA's Triton GEMM fusions are autotuned over dozens of tilings each: on an H200 the
        # first gemma-7b float32 run compiled for 22-30 s with them, 4 s without (cuBLAS's
        # float32 GEMMs, as torch's; bench/RESULTS.md). Read when the GPU backend starts.
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_gpu_enable_triton_gemm" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_triton_gemm=false".strip()
        device = self.options.device
        if device == "cpu" and jax.config.jax_platforms != "cpu":
            jax.config.update("jax_platforms", "cpu")  # before the first computation of this worker
        elif device == "cuda" and jax.default_backend() != "gpu":
            raise RuntimeError("--device cuda: jax sees no GPU here (install jax with CUDA support)")
        self.device = jax.default_backend()
        # On GPUs JAX multiplies float32 matrices in TF32 by default (10 mantissa bits): the
        # float32 oracle would be a TF32 one (measured on an H200: fp32 logits 7.9e-4 from HF
        # instead of ~1e-6 on CPU). The oracle computes what float32 means.
        jax.config.update("jax_default_matmul_precision", "highest")
        from llmdiff import safetensors_file
        from llmdiff.references import gemma
        from llmdiff.job import autocast_of, params_dtype

        knobs = dict(self.options.precision)
        if self.job.quant == "q8_0":  # ggml rounds the matmul inputs to Q8_0 too (gemma.Precision)
            knobs.setdefault("matmul_q8_0", True)
        if constants_dtype:  # an autocast run's constants are float32 (its weights' dtype)
            knobs["constants_dtype"] = params_dtype(constants_dtype)
        if autocast_of(dtype):
            knobs["autocast"] = autocast_of(dtype)
        self.precision = gemma.Precision.from_knobs(knobs)
        self.dtype = params_dtype(dtype)
        # Several devices: whole decoder layers placed over them, in order (what accelerate's
        # device maps do for torch), so each op runs as on one device and the captures are its.
        # Block streaming: each layer's weights are made (or read) when its block runs and
        # dropped after; otherwise all of them are on the device from the start.
        memory = self._device_memory()
        try:
            count, self.stream = self.placement(dtype, memory)
        except RuntimeError:
            raise RuntimeError(f"--devices {self.options.devices}: jax sees {len(memory)} {self.device} device(s)") from None
        used = jax.devices()[:count]
        L = self.spec.num_layers
        self.layer_devices = [used[i * count // L] for i in range(L)] if count > 1 else None
        self._from_kept = self._reuse(kept, dtype, memory)
        if self._from_kept is not None:
            self.top = self._cast(self._from_kept[0])
        else:
            kept = None   # off the device before this run's weights are on it
            self.top = {"embedder": {"input_embedding": self._tensors(["embed"])["embed"]},
                        "final_norm": {"scale": self._tensors(["final_norm"])["final_norm"]}}
            if not self.spec.tie_embeddings:  # an untied output head (Llama 3.1, Qwen 7B and up, Mistral)
                self.top["lm_head"] = self._tensors(["lm_head"])["lm_head"]
        self._canon = None
        self.__dict__.pop("_weight_sums", None)  # a failed run's sums go with it
        self.__dict__.pop("_streamed_weights", None)
        self._streamed = None
        if self.job.grad:  # the loss and its gradients, from canonical tensors
            if self.layer_devices:
                raise RuntimeError("--grad runs on one device; this run would spread its layers (--devices 1)")
            from llmdiff import convert

            # Block-streamed (`gemma_grad.streamed_loss_and_grads`) when asked, when the weights
            # would stream anyway, and with sketched captures (auto): a full-size run's weights,
            # their gradients and the Trainer's would not fit the device together.
            self.stream = self.options.stream is True or (self.options.stream == "auto" and (
                self.stream or self.sketching))
            if not self.stream:
                self._canon = self._tensors(list(convert.canonical_shapes(self.spec)))
        elif not self.stream:
            self._layers = [self._layer(i) for i in range(self.spec.num_layers)]
            if self.dtype == "float32" and self._kept is None and not self.layer_devices and memory and all(memory):
                # Kept on the device for the worker's next runs, which cast it there instead of
                # reading and converting the checkpoint again (`_reuse` decides whether they may).
                self._kept = (self.top, self._layers, None)
        # Teacher forcing: another implementation's captures feed every op (see gemma.Tape).
        forced_from = self.options.forced_from
        self._forced = None
        if forced_from:
            from llmdiff.grad import is_grad  # a --grad run's loss and gradients feed nothing

            self._forced = {n: np.asarray(a) for n, a in safetensors_file.load(forced_from).items() if not is_grad(n)}
            if any(n.endswith(":sketch") for n in self._forced):
                raise ValueError("teacher forcing needs whole captures, not sketches (--capture full)")
        self._offset = 0  # where the next prompt starts in the forced captures (prompts are concatenated)

    def _device_memory(self) -> list[int]:
        """Each visible device's memory (JAX's limit), 0 where it is not known (the host's)."""
        import jax

        return [(d.memory_stats() or {}).get("bytes_limit", 0) if self.device == "gpu" else 0 for d in jax.devices()]

    def _reuse(self, kept, dtype: str, memory: list[int]):
        """The float32 weights an earlier whole-model run of this worker left on the device, when
        this run may take its weights from them, cast on the device, instead of reading the
        checkpoint again: one device, no --grad, and the float32 set plus this run's own weights
        (none when streamed: a block's at a time) within half the device, placement's own bound.
        Never when a float32 value is subnormal: converting one is exact in IEEE arithmetic, but
        XLA may flush it to zero (measured: XLA:CPU makes float32 subnormals 0.0 in float64),
        and the weights must be the very bits a fresh load makes."""
        if kept is None or self.job.grad or self.layer_devices or not (memory and all(memory)):
            return None
        need = self.weight_bytes("float32") + (0 if self.stream or self.dtype == "float32" else self.weight_bytes(dtype))
        if need > memory[0] / 2:
            return None
        top, layers, subnormal = kept
        if subnormal is None:
            subnormal = any(bool(_has_subnormal()(a)) for a in _leaves((top, layers)))
        if subnormal:
            return None
        self._kept = (top, layers, False)
        return top, layers

    def _cast(self, tree):
        """The kept float32 arrays at this run's dtype (themselves at float32)."""
        import jax
        import jax.numpy as jnp

        dtype = jnp.dtype(self.dtype)
        return jax.tree.map(lambda a: a if a.dtype == dtype else a.astype(dtype), tree)

    def _tensors(self, names):
        """Canonical tensors on the device: made by the seeded generator, or read from the canonical
        file or the HF checkpoint's own files (`weights.canonical_tensors`)."""
        import jax.numpy as jnp

        from llmdiff import convert, weights

        source = self.job.weights
        if source.generated:
            if self.job.quant:
                raise ValueError(f"--quant {self.job.quant} rounds weights read from a file, not made from a seed")
            shapes = convert.canonical_shapes(self.spec)
            return {n: weights.generate_jax(self.spec, n, shapes[n], source.seed, self.dtype) for n in names}
        if self.device == "gpu" and not self.job.quant:
            # The checkpoint's tensors go to the GPU as stored and become canonical float32 there,
            # then this run's dtype (`HFCheckpoint.read` with `put`): the host converts nothing and moves
            # a 16-bit checkpoint's bytes once. Converted on the host, a gemma-7b checkpoint took
            # each oracle worker 25 s (bench/RESULTS.md). (On the CPU the host's conversion
            # threads are the device's; XLA:CPU may also alias an array of the mapped file.)
            loaded = weights.canonical_tensors(self.spec, source, names, put=jnp.asarray)
            return {n: a.astype(self.dtype) for n, a in loaded.items()}
        loaded = weights.canonical_tensors(self.spec, source, names).items()
        if self.job.quant:  # the weights as llama.cpp's converter quantises them (llmdiff/quant.py)
            from llmdiff import quant

            loaded = [(n, quant.round_trip(n, np.asarray(a, np.float32), self.job.quant)) for n, a in loaded]
        # Onto the device as read (float32), then cast there: `jnp.asarray(a, bfloat16)` casts
        # on the host, one core. Both round to nearest even.
        return {n: jnp.asarray(np.asarray(a)).astype(self.dtype) for n, a in loaded}

    def _layer(self, i):
        import jax
        import jax.numpy as jnp

        from llmdiff import convert

        if self._layers is not None:
            return self._layers[i]
        if self._from_kept is not None:
            return self._cast(self._from_kept[1][i])
        device = self.layer_devices[i] if self.layer_devices else jax.devices()[0]
        with jax.default_device(device):
            canon = self._tensors(convert.layer_names(self.spec, i))
            params = convert.unflatten(convert.to_deepmind_layer(self.spec, i, canon, stack=jnp.stack))
        return jax.device_put(params, device) if self.layer_devices else params

    def _reducer(self):
        """What each step keeps on the device of its captures, and the projections it needs."""
        reduce = _Reduce(self.sketching, self.round_to)
        if not self.sketching:
            return reduce, None
        if getattr(self, "_aux", None) is None:  # on the device once per worker
            s = self.spec
            widths = {s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.mlp_dim,
                      s.text_vocab_size}
            self._aux = {n: self._device_projection(n) for n in sorted(widths)}
        return reduce, self._aux

    def run(self, tokens):
        import jax
        import jax.numpy as jnp

        from llmdiff.references import gemma

        forced = None
        if self._forced is not None:
            lo, hi = self._offset, self._offset + len(tokens)
            forced = {n: jnp.asarray(a[:, lo:hi]) for n, a in self._forced.items()}
            self._offset = hi
        reduce, aux = self._reducer()
        caps = gemma.forward_blocks(self._layer, self.top, jnp.asarray([tokens], jnp.int32), self.spec,
                                    self.precision, forced, reduce=reduce, aux=aux, devices=self.layer_devices)
        wanted = {k: v for k, v in caps.items() if self.wants(k.split(":")[0])}
        # Sketches (all (B, T, K + 1)) leave the device as one array, not hundreds: each
        # transfer has its own fixed cost. Through page-locked host memory on GPUs (see hf.py).
        sketched = [k for k in wanted if k.endswith(":sketch")] if self.layer_devices is None else []
        if sketched:
            wanted[""] = jnp.stack([wanted.pop(k) for k in sketched])
        if self.device != "cpu":
            wanted = {k: jax.device_put(v, v.sharding.with_memory_kind("pinned_host")) for k, v in wanted.items()}
        host = {k: np.asarray(v) for k, v in jax.device_get(wanted).items()}
        if sketched:
            host.update(zip(sketched, host.pop("")))
        return host

    def run_grad(self, tokens):
        """The points, the causal-LM loss (`loss`, (1, 1)) and its gradients with respect to every
        point (`grad:POINT`) and every canonical weight (`grad:w:NAME`) (`gemma_grad.py`). With
        sketched captures the points and their gradients leave sketched (`llmdiff/sketch.py`) and
        the weight gradients are summed over prompts on the device, sketched by `finish_grad`."""
        import jax.numpy as jnp

        from llmdiff import grad
        from llmdiff.references import gemma_grad

        if self._forced is not None:
            raise ValueError("teacher forcing and --grad do not go together")
        if self.stream:
            return self._run_grad_streamed(tokens)
        loss, caps, g_points, g_weights = gemma_grad.loss_and_grads(
            self._canon, jnp.asarray([tokens], jnp.int32), self.spec, self.precision)
        trainer = gemma_grad.trainer_part(self._canon, tokens, self.job.tokens, self.spec, self.precision)
        out = {k: v for k, v in caps.items() if self.wants(k)}
        g_out = {grad.POINT + k: v for k, v in g_points.items() if self.wants(k)}
        if self.sketching:
            reduce, aux = self._reducer()
            out, g_out = reduce(out, aux), reduce(g_out, aux)
            self._sum_weights(grad.WEIGHT, g_weights)
            self._sum_weights(grad.TRAINER_WEIGHT, trainer)
        else:
            out.update({grad.WEIGHT + k: v for k, v in g_weights.items()})
            out.update({grad.TRAINER_WEIGHT + k: v for k, v in trainer.items()})
        out.update(g_out)
        out[grad.LOSS] = jnp.reshape(loss, (1, 1))
        if list(tokens) == list(self.job.tokens[0]):  # the whole batch's own-loss cases, once
            out.update(gemma_grad.loss_cases(self._canon, self.job.tokens, self.spec, self.precision))
        return _to_host(out)

    def _run_grad_streamed(self, tokens):
        """`run_grad` one decoder block at a time (`gemma_grad.streamed_loss_and_grads`): every
        prompt at the first call (a weight's gradient is summed over the prompts before it is
        sketched), each prompt's part returned by its own call; the weight gradients, sketched
        or whole, leave the device block by block and come out of `finish_grad`."""
        import jax.numpy as jnp

        from llmdiff import convert, grad
        from llmdiff.references import gemma_grad

        if self._streamed is None:
            prompts = [list(t) for t in self.job.tokens]
            weights = self.__dict__.setdefault("_streamed_weights", {})

            def layer(i):
                prefix = f"L{i}."
                return {k[len(prefix):]: v for k, v in self._tensors(convert.layer_names(self.spec, i)).items()}

            def emit(grads, trainer):
                named = {**{grad.WEIGHT + k: v for k, v in grads.items()},
                         **{grad.TRAINER_WEIGHT + k: v for k, v in trainer.items()}}
                weights.update(_to_host(sketch_weights(named, self._device_projection, self.round_to) if self.sketching
                                        else named))

            top = {"embed": self.top["embedder"]["input_embedding"], "final_norm": self.top["final_norm"]["scale"]}
            if "lm_head" in self.top:
                top["lm_head"] = self.top["lm_head"]
            reduce, aux = self._reducer()
            parts, logits = gemma_grad.streamed_loss_and_grads(layer, top, prompts, self.spec, self.precision,
                                                               reduce, aux, emit, self.phase)
            with self.phase("loss_cases"):
                cases = gemma_grad.loss_cases(None, prompts, self.spec, self.precision, logits=logits)
                cases = _to_host(cases)
            del logits
            self._streamed = []
            for b, part in enumerate(parts):
                out = {k: v for k, v in part["points"].items() if self.wants(k.split(":")[0])}
                out.update({grad.POINT + k: v for k, v in part["grads"].items() if self.wants(k.split(":")[0])})
                out[grad.LOSS] = jnp.reshape(part["loss"], (1, 1))
                if b == 0:
                    out.update(cases)
                self._streamed.append(_to_host(out))
        return self._streamed.pop(0)

    def _device_projection(self, n: int):
        """The sketch's R (n, K) on the device, made once per worker (gemma-7b's q rows are
        786432 wide: 400 MB in float64, asked for by every layer)."""
        import jax.numpy as jnp

        cache = self.__dict__.setdefault("_device_projections", {})
        if n not in cache:
            cache[n] = jnp.asarray(self.projection(n))
        return cache[n]

    def _sum_weights(self, prefix: str, grads: dict) -> None:
        """Weight gradients summed over prompts on the device (`gemma_grad.add_gradients`)."""
        from llmdiff.references import gemma_grad

        gemma_grad.add_gradients(self.__dict__.setdefault("_weight_sums", {}), grads, prefix)

    def finish_grad(self):
        """The weight gradients summed over the prompts, sketched per row on the device
        (`llmdiff/sketch.py`; 1-D ones whole)."""
        if self.stream:  # made block by block (`_run_grad_streamed`)
            return self.__dict__.pop("_streamed_weights", {})
        sums = self.__dict__.pop("_weight_sums", None) or {}
        return _to_host(sketch_weights(sums, self._device_projection, self.round_to))
    def run_bare(self, tokens):
        import jax.numpy as jnp

        from llmdiff.references import gemma

        caps = gemma.forward_blocks(self._layer, self.top, jnp.asarray([tokens], jnp.int32), self.spec,
                                    self.precision, reduce=_logits_only, devices=self.layer_devices)
        caps["logits"].block_until_ready()

    def peak_device_bytes(self):
        """The worker's peak so far (JAX cannot reset it): one number, or one per device used."""
        import jax

        used = sorted(set(self.layer_devices), key=lambda d: d.id) if self.layer_devices else jax.devices()[:1]
        peaks = {str(d): (d.memory_stats() or {}).get("peak_bytes_in_use") for d in used}
        if any(v is None for v in peaks.values()):
            return None
        return peaks if len(peaks) > 1 else next(iter(peaks.values()))

    def describe(self):
        return {**dataclasses.asdict(self.precision), "device": self.device, "streamed": self.stream,
                "devices": len(set(self.layer_devices)) if self.layer_devices else 1,
                "weights_from": "float32 run" if self._from_kept is not None else "source"}


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


@functools.lru_cache(maxsize=1)
def _has_subnormal():
    """f(a): whether float32 array `a` holds a subnormal value, from its bits (integer ops: a
    flush-to-zero mode does not touch them); one fused step, no temporaries of `a`'s size."""
    import jax
    import jax.numpy as jnp

    def f(a):
        bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
        return jnp.any(((bits & 0x7F800000) == 0) & ((bits & 0x007FFFFF) != 0))

    return jax.jit(f)


def _to_host(out: dict) -> dict:
    """Device arrays to numpy: float64 stays, the rest float32 (ids stay integers)."""
    import jax

    host = {}
    for k, v in jax.device_get(out).items():
        v = np.asarray(v)
        host[k] = v if v.dtype == np.float64 or v.dtype.kind in "iu" else v.astype(np.float32)
    return host


def sketch_weights(grads: dict, projection, round_to: str | None) -> dict:
    """Weight gradients (device arrays by capture name) as `llmdiff/sketch.py` sketches them per
    row, on the device: (rows, K + 1) under `NAME:sketch`, 1-D ones whole; a float64 run that
    measures a floor at another dtype rounds them to it first. `projection(n)`: R (n, K) on the
    device."""
    from llmdiff import sketch

    out = {}
    for name, g in grads.items():
        if not sketch.sketches_rows(g.shape):
            out[name] = g
            continue
        out[name + sketch.SUFFIX] = _sketch_rows(g.reshape(g.shape[0], -1), projection(int(np.prod(g.shape[1:]))),
                                                 round_to)
    return out


def _rounded(x, dtype: str):
    """x rounded to `dtype`; float64 to a 16-bit type through float32, as torch rounds and as
    `diff.round_to` does on the host: XLA rounds float64 to bfloat16 through float32 on a CPU
    but directly on a GPU, which differs in about 1 value in 100000 (a float32 tie)."""
    import jax.numpy as jnp

    if x.dtype == jnp.float64 and jnp.dtype(dtype).itemsize == 2:
        x = x.astype(jnp.float32)
    return x.astype(dtype)


def _sketch_rows(x, R, round_to, wide: bool = True):
    """x (..., n) -> (..., K + 1) [x R, |x|^2] (`llmdiff/sketch.py`), rounded to `round_to`
    first (a float64 run measuring a floor at that dtype); computed in `sketch.arithmetic` of
    the values' dtype and returned in float64, or (`wide=False`) in that arithmetic's dtype:
    float32 for 16-bit values, half the bytes to the host, nothing lost."""
    import jax.numpy as jnp

    from llmdiff import sketch

    if round_to:
        x = _rounded(x, round_to)
    dtype = sketch.arithmetic(str(x.dtype))
    # 16-bit values are not converted first: R's entries (+-1/8) are exact in 16 bits, and the
    # product accumulates in float32 (`preferred_element_type`: cuBLAS' float32 output on a GPU),
    # so the arithmetic is float32's without writing the values again at twice their size; the
    # conversion for the norm fuses into its reduction.
    if x.dtype.itemsize == 2:
        product = jnp.matmul(x, R.astype(x.dtype), preferred_element_type=dtype)
    else:
        x = x.astype(dtype)
        product = x @ R.astype(dtype)
    values = x.astype(dtype)
    out = jnp.concatenate([product, jnp.sum(values * values, axis=-1, keepdims=True)], axis=-1)
    return out.astype(jnp.float64) if wide else out


def _logits_only(caps, aux):
    return {k: v for k, v in caps.items() if k == "logits"}


@dataclasses.dataclass(frozen=True)
class _Reduce:
    """Traced into each jitted step (`gemma.forward_blocks`): every point whole (float32, or
    float64 in a float64 run), or sketched (`llmdiff/sketch.py`); a float64 run that measures a
    floor at another dtype rounds to it first. Hashable: it is a static argument."""

    sketching: bool
    round_to: str | None

    def __call__(self, caps, projections):
        import jax
        import jax.numpy as jnp

        if not self.sketching:
            return {name: v.astype(jnp.float64 if v.dtype == jnp.float64 else jnp.float32) for name, v in caps.items()}
        out, widths = {}, {}
        for name, v in caps.items():
            x = v.reshape(*v.shape[:2], -1)
            if self.round_to:
                x = _rounded(x, self.round_to)
            if name == "logits":  # the largest logits, values and ids
                out["logits:top_values"], out["logits:top_ids"] = jax.lax.top_k(x.astype(jnp.float32), 8)
            widths.setdefault((x.shape[-1], x.dtype), []).append((name, x))
        # The step's points of one width (and dtype) as one product and norm: per point, the
        # bfloat16 capture took 3.4x the bare forward at gemma-7b, grouped 1.9x (bench/RESULTS.md).
        for (n, _), items in widths.items():
            done = _sketch_rows(jnp.concatenate([x.reshape(-1, n) for _, x in items]), projections[n], None, wide=False)
            start = 0
            for name, x in items:
                count = x.shape[0] * x.shape[1]
                out[name + ":sketch"] = done[start:start + count].reshape(*x.shape[:2], -1)
                start += count
        return out
