"""Adapter for Google DeepMind's own `gemma` library (`gemma.gm.nn.Transformer`, gemma 3.3.0).

The model is built from the run's `ModelSpec` through DeepMind's `TransformerConfig` (it covers
Gemma 1, 2 and 3: post norms, softcaps, local/global layers, qk-norm, RoPE bases and scales),
loaded with the canonical weights via `convert.to_deepmind` (seeded full-size weights are
made on JAX's device, a layer at a time: `makes_weights`), and called the way a user calls it:
`model.apply({'params': params}, tokens)`. The library builds positions and the causal mask
itself from the tokens (it treats id 0 as padding, so prompts must not contain it). The
compute dtype is the dtype of the params handed to `apply` (`Transformer(dtype=...)` only
sets the dtype of params made by `init`).

Capture, all inside the one jitted call, with public Flax API only:
- `capture_intermediates` records the output of every module call and of `embedder.encode`:
  `embed`, the norms (and Gemma 2/3's post norms), `attn` (`attn_out`), the fused projections (`v`), the MLP's
  gating einsum (gate and up), the MLP (`mlp_out`), each block (`out`), `final_norm`.
- an `nn.intercept_methods` interceptor `sow`s values that are not a module's output: the
  input of `pre_ffw_norm` (`resid_mid`) and of the MLP's `linear` einsum (`mlp_act`), and q
  and k after RoPE, by wrapping `apply_rope` (called as a module global by `Attention`,
  first for q then for k) while an `Attention.__call__` is being traced.

XLA's excess precision is switched off, as in the oracle (see there): measured parity in
bfloat16 is with that flag. Not captured: `L{i}.attn_probs` (not a default point; the library exposes it as
`attn/attention_weights`, shape (B, T, N, S), but the oracle does not capture it). The
implementation needs gemma 3.3.0 and its dependency set (TensorFlow among them), which
llmdiff installs into a virtualenv of its own: `python -m llmdiff.references.deepmind_gemma
install` (see README).
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from llmdiff.references.base import MissingExtra, Reference

# The same reasoning as the oracle (references/oracle.py): without this XLA may keep a value in
# float32 where the program rounds it to bfloat16, so a bfloat16 run would not round where the
# library says it does. Read when the backend starts: set before jax is imported.
if "--xla_allow_excess_precision" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

GEMMA_VERSION = "3.3.0"
INSTALL = "pip install uv && python -m llmdiff.references.deepmind_gemma install"
VENV_NAME = "deepmind"


@contextlib.contextmanager
def _quiet_stderr():
    """TensorFlow (imported by kauldron) prints oneDNN/CUDA notices from C++ on import."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _import_gemma():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        with _quiet_stderr():
            import gemma
            from gemma.gm.math import _positional_embeddings
            from gemma.gm.nn import _config, _modules, _transformer
    except ImportError as exc:
        if getattr(exc, "name", None) and exc.name.split(".")[0] != "gemma" and "gemma" in sys.modules:
            raise  # gemma is there but one of its own dependencies is broken: show that
        if "gemma" in sys.modules and getattr(sys.modules["gemma"], "__version__", None):
            # Another release (`llmdiff matrix --impl deepmind`) without a module the adapter drives.
            raise MissingExtra(f"gemma {sys.modules['gemma'].__version__} has no {exc.name or 'gemma.gm'},"
                               " which the deepmind adapter drives") from None
        raise MissingExtra(f"implementation 'deepmind' needs the deepmind extra: {INSTALL}") from None
    # The extra pins GEMMA_VERSION; another 3.x release (`llmdiff matrix --impl deepmind`) has the
    # same `gemma.gm` modules and is run as it is: where it lacks something, its run says what.
    if int(gemma.__version__.split(".")[0]) < 3:
        raise MissingExtra(f"implementation 'deepmind' needs gemma 3.x, whose gemma.gm API it drives"
                           f" (found {gemma.__version__}): {INSTALL}")
    return _config, _modules, _transformer, _positional_embeddings


def transformer_config(spec, _config, _modules):
    """DeepMind's `TransformerConfig` for `spec`; every field comes from the spec."""
    types = {"global": _modules.AttentionType.GLOBAL, "local": _modules.AttentionType.LOCAL_SLIDING}
    attention_types = tuple(types[t] for t in (spec.attention_types or ("global",) * spec.num_layers))

    class SpecConfig(_config.TransformerConfig):
        # DeepMind picks the query scale from an enum (1/sqrt(head_dim) or 1/sqrt(D/N)); the
        # spec states the number itself (`query_pre_attn_scalar ** -0.5`), so say it directly.
        def query_pre_attn_scalar(self):
            return spec.query_scale

    def freq(base):  # DeepMind types the RoPE bases as int
        return int(base) if float(base).is_integer() else base

    return SpecConfig(
        num_embed=spec.vocab_size, embed_dim=spec.hidden_size, hidden_dim=spec.mlp_dim,
        num_heads=spec.num_heads, head_dim=spec.head_dim, num_kv_heads=spec.num_kv_heads,
        final_logit_softcap=spec.final_softcap, use_post_attn_norm=spec.post_attn_norm,
        use_post_ffw_norm=spec.post_mlp_norm, attention_types=attention_types,
        attn_logits_soft_cap=spec.attn_softcap, sliding_window_size=spec.sliding_window,
        transpose_gating_einsum=spec.transpose_gating, use_qk_norm=spec.qk_norm,
        local_base_frequency=freq(spec.rope_base_local), global_base_frequency=freq(spec.rope_base),
        local_scale_factor=spec.rope_scale_local, global_scale_factor=spec.rope_scale,
    )


def _captured(module, method_name: str) -> bool:
    """Which module methods `capture_intermediates` records: calls, and the embedder's encode."""
    return method_name in ("__call__", "encode")


class DeepMindReference(Reference):
    name = "deepmind"
    package = "gemma"
    makes_weights = True

    def __init__(self, job):
        super().__init__(job)
        self._config, self._modules, self._transformer, self._rope = _import_gemma()

    def versions(self):
        import flax
        import gemma
        import jax

        return {"gemma": gemma.__version__, "jax": jax.__version__, "flax": flax.__version__}

    def load(self, request):
        import jax
        import jax.numpy as jnp

        from llmdiff import convert, weights

        dtype = request.dtype
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"deepmind runs float32 and bfloat16, not {dtype}")
        spec = self.spec
        if spec.norm_eps != 1e-6:  # DeepMind's RMSNorm hard-codes it
            raise ValueError(f"DeepMind's RMSNorm uses eps 1e-6; {spec.name} has {spec.norm_eps}")
        if not spec.tie_embeddings:
            raise ValueError("DeepMind's gemma always ties the output projection to the embedding")
        self.config = transformer_config(spec, self._config, self._modules)
        self.model = self._transformer.Transformer(config=self.config, dtype=getattr(jnp, dtype))
        source = self.job.weights
        if source.generated:   # made here, on JAX's device, a layer at a time (full-size models)
            shapes = convert.canonical_shapes(spec)

            def made(names):
                return {n: weights.generate_jax(spec, n, shapes[n], source.seed, dtype) for n in names}

            top = made(["embed", "final_norm"])
            flat = {"embedder/input_embedding": top["embed"], "final_norm/scale": top["final_norm"]}
            for i in range(spec.num_layers):
                layer = made([n for n in shapes if n.startswith(f"L{i}.")])
                flat.update({f"layer_{i}/{k}": v
                             for k, v in convert.to_deepmind_layer(spec, i, layer, stack=jnp.stack).items()})
        else:
            flat = convert.to_deepmind(spec, weights.canonical_tensors(spec, source))
        self.params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=dtype), convert.unflatten(flat))
        self.dtype = dtype

    # --- capture ------------------------------------------------------------------------

    def _interceptor(self):
        """Sow, at trace time, the values that are not the output of a module method."""
        import flax.linen as nn

        Attention, Einsum = self._modules.Attention, self._modules._layers.Einsum
        RMSNorm = self._modules._layers.RMSNorm
        rope_module, original_rope = self._rope, self._rope.apply_rope
        state = {"attn": None, "calls": 0}

        def rope_and_sow(inputs, *args, **kwargs):
            out = original_rope(inputs, *args, **kwargs)
            attn = state["attn"]
            if attn is not None:
                attn.sow("intermediates", "rope_q" if state["calls"] == 0 else "rope_k", out)
                state["calls"] += 1
            return out

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            if isinstance(module, Attention):
                state["attn"], state["calls"] = module, 0
                rope_module.apply_rope = rope_and_sow
                try:
                    return next_fun(*args, **kwargs)
                finally:
                    rope_module.apply_rope = original_rope
                    state["attn"] = None
            if isinstance(module, RMSNorm) and module.name == "pre_ffw_norm":
                module.sow("intermediates", "input", args[0])
            elif isinstance(module, Einsum) and getattr(module, "weight_name", None) == "linear":
                module.sow("intermediates", "linear_input", args[1])  # args: (equation, x)
            return next_fun(*args, **kwargs)

        return nn.intercept_methods(interceptor)

    def run(self, tokens):
        import jax.numpy as jnp

        spec = self.spec
        if spec.pad_id in tokens:
            raise ValueError(f"prompt contains the padding id {spec.pad_id}, which DeepMind's gemma masks out")
        ids = jnp.asarray([tokens], jnp.int32)
        with self._interceptor():
            out, state = self.model.apply({"params": self.params}, ids, capture_intermediates=_captured,
                                          mutable=["intermediates"])
        inter = state["intermediates"]

        def f32(x):
            return np.asarray(jnp.asarray(x).astype(jnp.float32))

        cap = {"embed": f32(inter["embedder"]["encode"][0])}
        for i in range(spec.num_layers):
            layer, c = inter[f"layer_{i}"], f"L{i}."
            attn = layer["attn"]
            cap[c + "attn_norm"] = f32(layer["pre_attention_norm"]["__call__"][0])
            cap[c + "q"] = f32(attn["rope_q"][0])                                       # (B, T, N, H)
            cap[c + "k"] = f32(attn["rope_k"][0])                                       # (B, S, K, H)
            if "qkv_einsum" in attn:
                cap[c + "v"] = f32(attn["qkv_einsum"]["__call__"][0][2])                # (3, B, T, N, H)
            else:
                cap[c + "v"] = f32(attn["kv_einsum"]["__call__"][0][1])                 # (2, B, S, K, H)
            cap[c + "attn_out"] = f32(attn["__call__"][0][1])                           # (cache, out)
            if "post_attention_norm" in layer:
                cap[c + "post_attn_norm"] = f32(layer["post_attention_norm"]["__call__"][0])
            cap[c + "resid_mid"] = f32(layer["pre_ffw_norm"]["input"][0])
            cap[c + "mlp_norm"] = f32(layer["pre_ffw_norm"]["__call__"][0])
            # The MLP's einsums share its scope, so its `__call__` list holds, in call order,
            # the gating einsum's output (B, T, 2, F), the linear einsum's and the MLP's own.
            mlp = layer["mlp"]
            gating, _, mlp_out = mlp["__call__"]
            cap[c + "mlp_gate"], cap[c + "mlp_up"] = f32(gating[..., 0, :]), f32(gating[..., 1, :])
            cap[c + "mlp_act"] = f32(mlp["linear_input"][0])
            cap[c + "mlp_out"] = f32(mlp_out)
            if "post_ffw_norm" in layer:
                cap[c + "post_mlp_norm"] = f32(layer["post_ffw_norm"]["__call__"][0])
            cap[c + "out"] = f32(layer["__call__"][0][1])                               # (cache, out)
        cap["final_norm"] = f32(inter["final_norm"]["__call__"][0])
        # Logits over the ids a text token can take, as every implementation reports them (the
        # spec's `text_vocab_size`: Gemma 2's padded rows 256000..256127 are left out).
        vocab = getattr(spec, "text_vocab_size", spec.vocab_size)
        cap["logits"] = f32(out.logits[..., :vocab])
        return cap

    def describe(self):
        return {
            "model": "gemma.gm.nn.Transformer, called as model.apply({'params': params}, tokens)",
            "compute_dtype": getattr(self, "dtype", None),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "not_captured": {"L{i}.attn_probs": "opt-in point the oracle does not capture"},
            "notes": "positions and the causal mask are built by the library from the tokens (id 0 is padding)",
        }


# --- installation -----------------------------------------------------------------------

def lock_file():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "constraints" / "deepmind.txt"


def install(venvs_root=None, quiet: bool = False) -> str:
    """Create the `deepmind` virtualenv from the pinned lock with uv; return its interpreter."""
    import shutil
    import subprocess
    from pathlib import Path

    from llmdiff.runner import venvs_root as default_root

    lock = lock_file()
    if not lock.exists():
        raise SystemExit(f"llmdiff: error: {lock} not found (install llmdiff from its source tree: pip install -e .)")
    uv = shutil.which("uv")
    if uv is None:
        raise SystemExit("llmdiff: error: uv not found: pip install uv")
    venv = Path(venvs_root or default_root()) / VENV_NAME
    if venv.exists():
        shutil.rmtree(venv)
    q = ["-q"] if quiet else []
    # The venv's Python is this one (gemma 3.3.0 needs >= 3.11): uv downloads no interpreter.
    try:
        subprocess.run([uv, "venv", *q, "--python", sys.executable, str(venv)], check=True)
        python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
        subprocess.run([uv, "pip", "install", *q, "--python", str(python), "-r", str(lock)], check=True)
        subprocess.run([str(python), "-c", "from gemma.gm.nn import _transformer"], check=True,
                       env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), stderr=subprocess.DEVNULL)
    except (subprocess.CalledProcessError, KeyboardInterrupt):
        shutil.rmtree(venv, ignore_errors=True)  # never leave a half-built venv for the runner to pick
        raise SystemExit("llmdiff: error: installing the deepmind extra failed (see above)") from None
    return str(python)


if __name__ == "__main__":
    from llmdiff.references.base import install_main

    install_main("deepmind", f"Install Google DeepMind's gemma {GEMMA_VERSION} into llmdiff's 'deepmind' virtualenv.",
                 install)
