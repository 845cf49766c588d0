"""Adapter for keras-hub's Gemma on Keras 3's JAX backend (`--impl keras`).

The model is what a keras-hub user builds: `keras_hub.models.GemmaBackbone` (Gemma 1 and 2)
or `Gemma3Backbone` (Gemma 3, text only) with the constructor arguments keras-hub's own
Hugging Face converter derives from a config (`keras_hub/src/utils/transformers/
convert_gemma.py`, `convert_gemma3.py`), here from the run's `ModelSpec`, wrapped in
`GemmaCausalLM`/`Gemma3CausalLM(backbone=..., preprocessor=None)` and called as users call it:
`causal_lm({"token_ids": ids, "padding_mask": ones})`, which returns the logits. The weights
are llmdiff's canonical set assigned to the backbone's variables (same layouts as keras-hub's
HF converter gives them: q/k/v kernels (heads, D, H), output (N, H, D), `ffw_gating` the GELU
branch, `ffw_gating_2` the linear one, norm scales without the +1), in the run's dtype
(`dtype="float32"` or `"bfloat16"`: Keras' dtype policy, weights and compute both).

Capture, with no math re-implemented: during that one call every sublayer a decoder block
calls (`pre_attention_norm`, the attention's `query_dense`/`value_dense`/`_apply_rope`/
`output_dense`, `post_attention_norm`, `pre_ffw_norm`, `ffw_gating`, `ffw_gating_2`,
`ffw_linear`, `post_ffw_norm`), each block and the final norm have their `call` wrapped on
the instance (Keras' `Layer.__call__` calls `self.call`), recording inputs and outputs:

| canonical | Keras |
|---|---|
| `embed` | the input of `decoder_block_0` (the backbone's `token_embedding(ids) * cast(sqrt(D))`) |
| `L{i}.attn_norm` | `decoder_block_i.pre_attention_norm` output |
| `L{i}.q`, `L{i}.k` | `attention._apply_rope` output, first call q, second k (after Gemma 3's `query_norm`/`key_norm`); Gemma 1/2 put back from keras-hub's interleaved layout |
| `L{i}.v` | `attention.value_dense` output |
| `L{i}.attn_out` | `attention.output_dense` output |
| `L{i}.post_attn_norm` | `post_attention_norm` output (Gemma 2/3) |
| `L{i}.resid_mid` | `pre_ffw_norm` input |
| `L{i}.mlp_norm` | `pre_ffw_norm` output |
| `L{i}.mlp_gate`, `L{i}.mlp_up` | `ffw_gating`, `ffw_gating_2` outputs |
| `L{i}.mlp_act` | `ffw_linear` input |
| `L{i}.mlp_out` | `ffw_linear` output |
| `L{i}.post_mlp_norm` | `post_ffw_norm` output (Gemma 2/3) |
| `L{i}.out` | `decoder_block_i` output |
| `final_norm` | `final_normalization` output |
| `logits` | the CausalLM's output (`token_embedding(h, reverse=True)`, soft-capped), the first `text_vocab_size` columns |

Gemma 1/2's attention (`CachedGemmaAttention._apply_rope`) applies RoPE to the two halves of
each head and then interleaves them (`reshape(stack(split(x, 2), -1))`, "numerically
equivalent to the original gemma implementation": q and k are permuted alike, so q·k is
unchanged); the captured q and k are put back into the halves layout. Gemma 3's does not.

What keras-hub 0.32.0 can express is checked in `load`, one line naming what it cannot: its
blocks hard-code which layers are local (Gemma 2: even layers; Gemma 3: 5 of 6) and the RoPE
bases (10k; Gemma 3: 10k local, 1M global), and its query scale is `head_dim ** -0.5` or
`(D // N) ** -0.5` (`query_head_dim_normalize`).

Found in keras-hub 0.32.0 (see docs/design.md, Keras): `GemmaDecoderBlock.__init__`
(keras_hub/src/models/gemma/gemma_decoder_block.py) and `Gemma3DecoderBlock.__init__`
(keras_hub/src/models/gemma3/gemma3_decoder_block.py) build their `CachedGemma*Attention`
with `query_head_dim_normalize=True` whatever the backbone was given, so a model whose
`query_pre_attn_scalar` is `D / N`, not `head_dim` (Gemma 2 27B: 144 vs 128; Gemma 3 27B:
168 vs 128), scales its queries by `head_dim ** -0.5`; keras-hub's HF converter does set
`query_head_dim_normalize=False` for them. Likewise the blocks get no `layer_norm_epsilon`
(every norm but the final one uses 1e-6; Gemma's is 1e-6, so no released model is affected).

Runs feed the prompts' ids, as to every implementation. keras-hub's own tokenizer
(`GemmaTokenizer`, `Gemma3Tokenizer`, built from the same tokenizer.model) is judged by tokenizer
parity when keras is compared (`compare --impl keras`, `tokenize --impl keras`): `keras_tokenizers`
runs it in the keras virtualenv (keras_tokenizer_server.py) in both of keras-hub 0.32's paths,
`keras` (eager: native sentencepiece, in the base install) and `keras-tf` (the tf.data path:
tensorflow-text, only with `install --tensorflow-text`, which adds TensorFlow). The
implementation lives in a virtualenv of its own: `python -m llmdiff.references.keras_gemma
install` (keras-hub without TensorFlow, see `install`).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from llmdiff.references.base import MissingExtra, Reference

# As the oracle and the deepmind adapter: XLA must not keep a bfloat16 value in float32 where
# the program rounds it. Read when the backend starts: set before jax is imported.
if "--xla_allow_excess_precision" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

KERAS_HUB_VERSION = "0.32.0"
INSTALL = "python -m llmdiff.references.keras_gemma install"
VENV_NAME = "keras"
GLOBAL_ROPE_BASE = {"gemma": 10_000.0, "gemma2": 10_000.0, "gemma3": 1_000_000.0}
LOCAL_ROPE_BASE = 10_000.0


def _import_keras_hub():
    os.environ["KERAS_BACKEND"] = "jax"       # this adapter is keras-hub on JAX
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import keras
        import keras_hub
    except ImportError as exc:
        name = (getattr(exc, "name", None) or "").split(".")[0]
        if name and name not in ("keras", "keras_hub") and "keras_hub" in sys.modules:
            raise  # keras-hub is there but one of its own dependencies is broken: show that
        raise MissingExtra(f"implementation 'keras' needs the keras extra: {INSTALL}") from None
    if keras_hub.__version__ != KERAS_HUB_VERSION:
        raise MissingExtra(f"implementation 'keras' needs keras-hub {KERAS_HUB_VERSION}"
                           f" (found {keras_hub.__version__}): {INSTALL}")
    if keras.backend.backend() != "jax":
        raise MissingExtra(f"implementation 'keras' runs Keras on JAX; Keras was imported with the"
                           f" {keras.backend.backend()} backend")
    return keras, keras_hub


def local_layers(family: str, num_layers: int) -> tuple[bool, ...]:
    """Which layers keras-hub makes sliding-window ones (its backbones hard-code it)."""
    if family == "gemma":
        return (False,) * num_layers
    if family == "gemma2":
        return tuple(i % 2 == 0 for i in range(num_layers))      # GemmaBackbone: i % 2 == 0
    return tuple(i % 6 < 5 for i in range(num_layers))           # Gemma3Backbone: i % 6 < 5


def backbone_config(spec) -> dict:
    """The keras-hub constructor arguments for `spec`, as keras-hub's HF converter derives them
    from a config; a ValueError names what keras-hub cannot express."""
    if spec.family not in GLOBAL_ROPE_BASE:
        raise ValueError(f"keras-hub's Gemma runs Gemma 1, 2 and 3, not {spec.family}")
    D, N, H = spec.hidden_size, spec.num_heads, spec.head_dim
    if spec.query_pre_attn_scalar == H:
        head_dim_normalize = True
    elif spec.query_pre_attn_scalar == D // N:
        head_dim_normalize = False
    else:
        raise ValueError(f"keras-hub scales queries by head_dim or hidden/heads; {spec.name}'s"
                         f" query_pre_attn_scalar is {spec.query_pre_attn_scalar}")
    types = spec.attention_types or ("global",) * spec.num_layers
    local = tuple(t == "local" for t in types)
    expected = local_layers(spec.family, spec.num_layers)
    if any(local) and local != expected:
        raise ValueError(f"keras-hub's {spec.family} layers are local at {[i for i, x in enumerate(expected) if x]};"
                         f" {spec.name}'s at {[i for i, x in enumerate(local) if x]}")
    if float(spec.rope_base) != GLOBAL_ROPE_BASE[spec.family] or (any(local) and float(spec.rope_base_local) != LOCAL_ROPE_BASE):
        raise ValueError(f"keras-hub hard-codes the RoPE bases of {spec.family}; {spec.name} has"
                         f" {spec.rope_base} (local {spec.rope_base_local})")
    if spec.norm_eps != 1e-6:
        raise ValueError(f"keras-hub's Gemma blocks use RMSNorm eps 1e-6; {spec.name} has {spec.norm_eps}")
    if not spec.tie_embeddings:
        raise ValueError("keras-hub's Gemma always ties the output projection to the embedding")
    if spec.qkv_bias or spec.post_attn_norm != spec.post_mlp_norm:
        raise ValueError(f"keras-hub's Gemma has no layout for {spec.name}'s projections/norms")
    gemma3 = spec.family == "gemma3"
    if spec.qk_norm != gemma3:
        raise ValueError(f"keras-hub's {spec.family} {'has' if gemma3 else 'has no'} q/k norm")
    if not gemma3 and (spec.rope_scale != 1.0 or spec.rope_scale_local != 1.0):
        raise ValueError(f"keras-hub's {spec.family} has no RoPE scaling")
    config = dict(
        vocabulary_size=spec.hf_vocab_size or spec.vocab_size, num_layers=spec.num_layers,
        num_query_heads=N, num_key_value_heads=spec.num_kv_heads, hidden_dim=D,
        intermediate_dim=spec.mlp_dim * (1 if gemma3 else 2), head_dim=H,
        query_head_dim_normalize=head_dim_normalize,
        use_post_ffw_norm=spec.post_mlp_norm, use_post_attention_norm=spec.post_attn_norm,
        attention_logit_soft_cap=spec.attn_softcap, final_logit_soft_cap=spec.final_softcap,
        use_sliding_window_attention=any(local), sliding_window_size=spec.sliding_window or 4096,
        layer_norm_epsilon=spec.norm_eps,
    )
    if gemma3:
        config.update(image_size=896, vision_encoder=None, use_query_key_norm=True,
                      local_rope_scaling_factor=spec.rope_scale_local, global_rope_scaling_factor=spec.rope_scale)
    return config


def keras_weights(spec, canon: dict, backbone) -> dict:
    """{keras variable path: array} for `backbone` from the canonical set."""
    from llmdiff import convert

    convert.check_tensors(canon, convert.canonical_shapes(spec), "canonical weights", spec)
    out = {backbone.get_layer("token_embedding").embeddings.path:
           convert.resize_rows(canon["embed"], spec.hf_vocab_size or spec.vocab_size),
           backbone.get_layer("final_normalization").scale.path: canon["final_norm"]}
    for i in range(spec.num_layers):
        b, c = backbone.get_layer(f"decoder_block_{i}"), f"L{i}."
        a = b.attention
        pairs = [(b.pre_attention_norm.scale, "attn_norm"), (a.query_dense.kernel, "q"), (a.key_dense.kernel, "k"),
                 (a.value_dense.kernel, "v"), (a.output_dense.kernel, "o"), (b.pre_ffw_norm.scale, "mlp_norm"),
                 (b.gating_ffw.kernel, "gate"), (b.gating_ffw_2.kernel, "up"), (b.ffw_linear.kernel, "down")]
        if spec.post_attn_norm:
            pairs += [(b.post_attention_norm.scale, "post_attn_norm"), (b.post_ffw_norm.scale, "post_mlp_norm")]
        if spec.qk_norm:
            pairs += [(a.query_norm.scale, "q_norm"), (a.key_norm.scale, "k_norm")]
        for var, name in pairs:
            out[var.path] = canon[c + name]
    return out


def halves(x: np.ndarray) -> np.ndarray:
    """keras-hub's Gemma 1/2 interleaved RoPE output (pairs: half 0 index i, half 1 index i)
    put back into the halves layout."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2).swapaxes(-1, -2).reshape(x.shape)


class KerasReference(Reference):
    name = "keras"
    package = "keras-hub"
    dtypes = ("float32", "bfloat16")

    def __init__(self, job):
        super().__init__(job)
        self.keras, self.keras_hub = _import_keras_hub()
        self.model = None

    def versions(self):
        import jax

        return {"keras-hub": self.keras_hub.__version__, "keras": self.keras.__version__, "jax": jax.__version__}

    def load(self, request):
        from llmdiff import weights

        self.model = None
        self.keras.backend.clear_session()
        dtype = request.dtype
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"keras runs float32 and bfloat16, not {dtype}")
        if self.job.weights.generated:
            raise ValueError("keras loads the weights from a file; weights made from a seed on the device have none")
        if self.options.device == "cuda":
            import jax

            if not any(d.platform == "gpu" for d in jax.devices()):
                raise ValueError("--device cuda: the keras virtualenv's JAX sees no GPU (install builds it for the CPU)")
        spec = self.spec
        config = backbone_config(spec)
        models = self.keras_hub.models
        if spec.family == "gemma3":
            backbone = models.Gemma3Backbone(**config, dtype=dtype)
            self.model = models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
        else:
            backbone = models.GemmaBackbone(**config, dtype=dtype)
            self.model = models.GemmaCausalLM(backbone=backbone, preprocessor=None)
        self.backbone, self.config, self.dtype = backbone, config, dtype
        canon = weights.canonical_tensors(spec, self.job.weights)
        values = keras_weights(spec, canon, backbone)
        variables = {v.path: v for v in backbone.weights}
        missing = sorted(set(variables) - set(values))
        if missing:
            raise RuntimeError(f"keras-hub variable {missing[0]!r} has no canonical weight")
        for path, value in values.items():
            var = variables[path]
            if tuple(var.shape) != tuple(value.shape):
                raise RuntimeError(f"{path}: keras-hub shape {tuple(var.shape)}, canonical {tuple(value.shape)}")
            var.assign(np.asarray(value, np.float32).astype(var.dtype))

    # --- capture ------------------------------------------------------------------------

    def _wrap(self, layer, attr, record):
        """Wrap `layer.<attr>` on the instance; `record(args, out)` sees each call."""
        original = getattr(layer, attr)

        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            record(args, out)
            return out

        self._wrapped.append((layer, attr, layer.__dict__.get(attr)))
        object.__setattr__(layer, attr, wrapped)

    def _unwrap(self):
        for layer, attr, before in reversed(self._wrapped):
            if before is None:
                object.__delattr__(layer, attr)
            else:
                object.__setattr__(layer, attr, before)
        self._wrapped = []

    def run(self, tokens):
        import jax.numpy as jnp

        spec, bb = self.spec, self.backbone
        cap: dict[str, np.ndarray] = {}

        def f32(x):
            return np.asarray(jnp.asarray(x).astype(jnp.float32))

        def put(name, index=None, fn=None):
            def record(args, out):
                v = out if index is None else args[index]
                v = f32(v)
                cap[name] = fn(v) if fn is not None else v
            return record

        interleaved = spec.family != "gemma3"
        self._wrapped = []
        try:
            for i in range(spec.num_layers):
                b, c = bb.get_layer(f"decoder_block_{i}"), f"L{i}."
                a = b.attention
                if i == 0:
                    self._wrap(b, "call", put("embed", index=0))
                self._wrap(b.pre_attention_norm, "call", put(c + "attn_norm"))
                rope_calls = []

                def rope(args, out, c=c, calls=rope_calls):
                    v = f32(out)
                    cap[c + ("q" if not calls else "k")] = halves(v) if interleaved else v
                    calls.append(1)

                self._wrap(a, "_apply_rope", rope)
                self._wrap(a.value_dense, "call", put(c + "v"))
                self._wrap(a.output_dense, "call", put(c + "attn_out"))
                if spec.post_attn_norm:
                    self._wrap(b.post_attention_norm, "call", put(c + "post_attn_norm"))
                self._wrap(b.pre_ffw_norm, "call", lambda args, out, c=c: (
                    cap.__setitem__(c + "resid_mid", f32(args[0])), cap.__setitem__(c + "mlp_norm", f32(out))))
                self._wrap(b.gating_ffw, "call", put(c + "mlp_gate"))
                self._wrap(b.gating_ffw_2, "call", put(c + "mlp_up"))
                self._wrap(b.ffw_linear, "call", lambda args, out, c=c: (
                    cap.__setitem__(c + "mlp_act", f32(args[0])), cap.__setitem__(c + "mlp_out", f32(out))))
                if spec.post_mlp_norm:
                    self._wrap(b.post_ffw_norm, "call", put(c + "post_mlp_norm"))
                self._wrap(b, "call", put(c + "out"))
            self._wrap(bb.get_layer("final_normalization"), "call", put("final_norm"))
            ids = np.asarray([tokens], np.int32)
            logits = self.model({"token_ids": ids, "padding_mask": np.ones_like(ids)})
        finally:
            self._unwrap()
        vocab = getattr(spec, "text_vocab_size", spec.vocab_size)
        cap["logits"] = f32(logits)[..., :vocab]
        return {k: v for k, v in cap.items() if self.wants(k)}

    def describe(self):
        family = self.spec.family
        return {
            "model": ("keras_hub.models.Gemma3CausalLM(Gemma3Backbone)" if family == "gemma3"
                      else "keras_hub.models.GemmaCausalLM(GemmaBackbone)")
                     + ", called as causal_lm({'token_ids', 'padding_mask'}) on Keras' JAX backend",
            "backbone_config": {k: v for k, v in getattr(self, "config", {}).items() if k != "vision_encoder"},
            "dtype_policy": getattr(self, "dtype", None),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "tied_lm_head": True,   # ReversibleEmbedding(tie_weights=True): the logits read token_embedding
            # (not "tokenizer": that key is a tokenizer's report, which the LD0xx checks read)
            "inputs": "the prompts' ids; keras-hub's tokenizer is judged by tokenizer parity (keras, keras-tf)",
        }


# --- its own tokenizer, for tokenizer parity (`--impl keras`) -------------------------------

class _TokenizerServer:
    """keras_tokenizer_server.py under the keras virtualenv's interpreter (or this one, where
    keras-hub is importable): one process for the whole parity run, one JSON line a call."""

    def __init__(self, python: str, model_file, family: str):
        import subprocess
        import tempfile
        import weakref
        from pathlib import Path

        server = Path(__file__).with_name("keras_tokenizer_server.py")
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([python, str(server), str(model_file), family], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, encoding="utf-8",
                                     env=dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3"))
        weakref.finalize(self, _stop, self.proc, self.stderr)
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            lines = [x for x in self.stderr.read().splitlines() if x.strip()]
            raise RuntimeError(lines[-1] if lines else f"exit {self.proc.returncode}")
        self.hello = json.loads(line)["hello"]

    def call(self, impl: str, op: str, arg):
        self.proc.stdin.write(json.dumps({"impl": impl, "op": op, "arg": arg}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"keras-hub's tokenizer process ended (exit {self.proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"keras-hub's {impl} tokenizer, {op}: {reply['error']}")
        return reply["ok"]


def _stop(proc, stderr):
    try:
        proc.stdin.close()
        proc.wait(timeout=30)
    except Exception:  # noqa: BLE001 - already gone, or stuck: never hold the caller
        proc.kill()
    stderr.close()


def keras_tokenizers(model_file, spec) -> list:
    """keras-hub's Gemma tokenizer built from `model_file`, as tokenizer parity's encoders: `keras`
    (its default eager path: native sentencepiece) and `keras-tf` (the tf.data path:
    tensorflow-text), each unavailable, with the reason, where it cannot run. See
    keras_tokenizer_server.py for how each is called."""
    import importlib.util

    from llmdiff.runner import venv_python
    from llmdiff.tokenizer_encoders import Encoder

    class KerasTokenizer(Encoder):
        def __init__(self, name, server=None, reason=None):
            super().__init__()
            self.name, self.server = name, server
            if server is None or reason:
                self.available, self.reason = False, reason
            else:
                versions = server.hello["versions"]
                self.version = f"keras-hub {versions['keras-hub']}" + (
                    f", tensorflow-text {versions.get('tensorflow-text')}" if name == "keras-tf" else
                    f", sentencepiece {versions['sentencepiece']}")

        def encode(self, text):  # what causal_lm.generate(text) feeds the model
            return self.server.call(self.name, "encode", text)

        def encode_text(self, text):  # tokenizer(text)
            return self.server.call(self.name, "encode_text", text)

        def decode(self, ids):
            return self.server.call(self.name, "decode", [int(i) for i in ids])

        def piece(self, i):
            return self.server.call(self.name, "piece", int(i))

    if spec.family not in GLOBAL_ROPE_BASE:
        return []
    python = venv_python(VENV_NAME)
    if python is None:
        if importlib.util.find_spec("keras_hub") is None:
            return [KerasTokenizer("keras", reason=f"keras-hub is not installed (it lives in its own virtualenv: {INSTALL})")]
        python = sys.executable
    try:
        server = _TokenizerServer(python, model_file, spec.family)
    except Exception as e:  # noqa: BLE001 - an optional implementation never stops the others
        return [KerasTokenizer("keras", reason=f"cannot load keras-hub's tokenizer: {type(e).__name__}: {e}")]
    reasons = server.hello["reasons"]
    return [KerasTokenizer(name, server, reasons.get(name)) for name in ("keras", "keras-tf")]


# --- installation -----------------------------------------------------------------------

def lock_file():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "constraints" / "keras.txt"


TF_MARKER = "# [tensorflow-text]"


def lock_parts(lock) -> tuple[list[str], list[str]]:
    """constraints/keras.txt's pins: the base set, and the tensorflow-text part after its marker."""
    base, tf_part, part = [], [], None
    for line in lock.read_text().splitlines():
        if line.startswith(TF_MARKER):
            part = tf_part
        elif line.strip() and not line.startswith("#"):
            (base if part is None else part).append(line.strip())
    return base, tf_part


def install(venvs_root=None, quiet: bool = False, tensorflow_text: bool = False) -> str:
    """Create the `keras` virtualenv: keras-hub without its declared tensorflow-text (and so
    without TensorFlow: its model code guards every TensorFlow import; only its tokenizers and
    preprocessing need it), Keras, JAX (CPU) and what keras-hub imports, all pinned in
    constraints/keras.txt. Returns its interpreter."""
    import shutil
    import subprocess
    import time
    import venv as venv_mod
    from pathlib import Path

    from llmdiff.runner import venvs_root as default_root

    lock = lock_file()
    if not lock.exists():
        raise SystemExit(f"llmdiff: error: {lock} not found (install llmdiff from its source tree: pip install -e .)")
    venv = Path(venvs_root or default_root()) / VENV_NAME
    if venv.exists():
        shutil.rmtree(venv)
    q = ["-q"] if quiet else []
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    t0 = time.perf_counter()
    try:
        venv_mod.create(venv, with_pip=True)
        base, tf_part = lock_parts(lock)
        pip = [str(python), "-m", "pip", "install", *q, "--disable-pip-version-check", "--no-deps"]
        # Every package pinned, none resolved: --no-deps keeps keras-hub's tensorflow-text out.
        subprocess.run([*pip, *base], check=True)
        subprocess.run([str(python), "-c", "import keras_hub; keras_hub.models.GemmaCausalLM; keras_hub.models.Gemma3CausalLM;"
                        " keras_hub.models.GemmaTokenizer; import sentencepiece"],
                       check=True, env=dict(os.environ, KERAS_BACKEND="jax"))
        took = time.perf_counter() - t0
        if tensorflow_text:
            t1 = time.perf_counter()
            subprocess.run([*pip, *tf_part], check=True)
            subprocess.run([str(python), "-c", "import tensorflow_text"], check=True,
                           env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
            print(f"keras: tensorflow-text added in {time.perf_counter() - t1:.0f} s", file=sys.stderr)
    except (subprocess.CalledProcessError, KeyboardInterrupt):
        shutil.rmtree(venv, ignore_errors=True)  # never leave a half-built venv for the runner to pick
        raise SystemExit("llmdiff: error: installing the keras extra failed (see above)") from None
    print(f"keras: installed in {took:.0f} s (total {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return str(python)


if __name__ == "__main__":
    from llmdiff.references.base import install_main

    install_main("keras", f"Install keras-hub {KERAS_HUB_VERSION} (JAX backend, no TensorFlow) into llmdiff's"
                          " 'keras' virtualenv.", install,
                 [("--tensorflow-text", "also tensorflow-text and TensorFlow (CPU, about 2 GB): keras-hub's tf.data"
                                        " tokenizer path, judged by tokenizer parity as keras-tf")])
