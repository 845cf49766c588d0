"""Adapter for Hugging Face transformers (`GemmaForCausalLM`, `Gemma2ForCausalLM`, the
text-only `Gemma3ForCausalLM`, `LlamaForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`,
`MistralForCausalLM`, `Phi3ForCausalLM`), loaded the way users load it.

Capture works on transformers 4.38 to today: the attention code changed a lot between them
(per-class eager/SDPA attention in 4.38; one attention module and an attention-function
registry since 4.48), so points are taken only where every release agrees:
- module hooks on submodules that exist in all of them (norms, projections, layers);
- `embed` as the input of layer 0 (4.38 scales embeddings inline in `GemmaModel.forward`,
  later releases inside a scaled-embedding module);
- q and k after RoPE by wrapping the modeling module's `apply_rotary_pos_emb`, which every
  release calls by its global name from the attention forward (Gemma 3's q/k norms come
  before it, so they are included).
Gemma 2/3 layers have four norms: `post_attention_layernorm` is then the norm *after*
attention and `pre_feedforward_layernorm` the one before the MLP (in Gemma 1 the former is the
pre-MLP norm). Phi-3 fuses q, k, v into `self_attn.qkv_proj` and gate, up into
`mlp.gate_up_proj`: v, gate and up are their outputs' slices (the same slices its forward takes).
Logits are kept over the ids a text token can take (`text_vocab_size`): Gemma 3 4B-27B
checkpoints have 64 more rows than DeepMind's table.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np

from llmdiff.references.base import Reference

TOP_LOGITS = 8  # llmdiff.sketch.TOP
_MM_OUT_DTYPE: dict = {}   # "cuda": whether `torch.mm(a, b, out_dtype)` runs (`_product`), once tried
# A run dtype -> the dtype the weights are loaded in (autocast: float32 weights, bfloat16 products).
_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float64": "float64", "autocast-bfloat16": "float32",
                 "autocast-float16": "float32"}


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def _first_tensor(args, kwargs, key):
    return args[0] if args else kwargs[key]


class HFReference(Reference):
    name = "hf"
    dtypes = ("float32", "bfloat16", "autocast-bfloat16", "autocast-float16")
    package = "transformers"
    has_bare_forward = True
    makes_weights = True

    def versions(self):
        import torch
        import transformers

        return {"torch": torch.__version__, "transformers": transformers.__version__}

    def load(self, request):
        import gc

        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        dtype = request.dtype
        self.model = self._weights = self._taps = None  # the last run's model leaves the device first
        self.__dict__.pop("_points_changed_in_place", None)
        # ...now, not at some later collection: after a --grad run the Trainer (its accelerator)
        # and the model refer to each other, and gemma-7b's float32 weights stayed on the H200
        # through the bfloat16 run (127 GB peak).
        gc.collect()
        self._own_losses, self._accumulated, self._accumulated_error = [], [], None
        self._trainer, self._norm_grads = None, {"plain": {}, "whole_batch": {}}
        self._grad_sums, self._grad_prompts = {}, 0   # sketched --grad: weight gradients summed on the device
        self.__dict__.pop("_plain_sums", None)
        device = self.options.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no GPU here")
        memory = ([torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
                  if device == "cuda" else [0])
        count, self.stream = self.placement(dtype, memory)
        if count > 1 and self.stream:
            raise RuntimeError(f"--devices {count} with --stream: the hf worker either spreads the layers over"
                               " GPUs or streams them through one; drop one of the two")
        if device == "cuda":
            torch.cuda.empty_cache()
            for i in range(count):
                torch.cuda.reset_peak_memory_stats(i)
        self.device, self.devices = device, count
        self.device_map = None  # module name -> GPU, when the layers are spread over several
        torch.manual_seed(0)
        self.torch_dtype = getattr(torch, _TORCH_DTYPES[dtype])
        from llmdiff.job import autocast_of

        # Mixed precision: float32 weights, the forward under torch.autocast (`run`).
        self.autocast = getattr(torch, autocast_of(dtype)) if autocast_of(dtype) else None
        # `dtype=` replaced `torch_dtype=` in transformers 4.56; older releases only know the latter.
        dtype_kw = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
        self.attn_implementation = self.options.attn
        source = self.job.weights
        if source.generated or self.stream or count > 1:
            model = self._skeleton(source.hf_dir, dtype_kw, memory[:count])
        else:
            # Safetensors only (a pickle beside them is never loaded) and never the checkpoint's
            # own code: the files llmdiff's reader chose (`llmdiff/checkpoint_files.py`).
            # On a GPU the weights go to it as they are read (`device_map`): loaded on the host
            # first, gemma-7b's float32 model held 49.7 GB of host memory (the run's peak).
            placed = {"device_map": device} if device == "cuda" else {}
            model = AutoModelForCausalLM.from_pretrained(
                source.hf_dir, attn_implementation=self.attn_implementation, use_safetensors=True,
                trust_remote_code=False, **{dtype_kw: self.torch_dtype}, **placed)
            model.to(device)  # buffers too: RoPE's inv_freq keeps its float32 dtype through .to(device)
        model.eval()
        self.checkpointing = None
        if self.options.grad_checkpointing and self.job.grad:
            self.checkpointing = self._enable_checkpointing(model)
        self.model = self.patch_model(model)

    @staticmethod
    def _enable_checkpointing(model) -> dict:
        """transformers' own gradient checkpointing on every decoder layer, with its defaults
        (`activation_checkpointing_enable` since 5.x, `gradient_checkpointing_enable` before): the
        layers' forward runs again in the backward to give it the activations it did not keep.
        It acts in train mode only (`_run` puts the model there for a `--grad` forward and
        backward). What it resolved to, for the details."""
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        func = getattr(model.model.layers[0], "_gradient_checkpointing_func", None)
        return {"enabled": True, "function": getattr(getattr(func, "func", func), "__qualname__", repr(func)),
                "kwargs": dict(getattr(func, "keywords", {}) or {}),
                "dropout": {k: v for k, v in model.config.to_dict().items() if "dropout" in k},
                "recomputed_layers": 0}   # counted over the run's prompts (`_run`)

    def device_of(self, name: str):
        """Where parameter or module `name` lives: its GPU in the device map, else the device."""
        if self.device_map is None:
            return self.device
        parts = name.split(".")
        for k in range(len(parts), -1, -1):
            where = self.device_map.get(".".join(parts[:k]))
            if where is not None:
                return f"cuda:{where}" if isinstance(where, int) else where
        return self.device

    # --- Full-size weights: made on the device, or streamed block by block --------------------

    def _skeleton(self, hf_dir, dtype_kw, memory):
        """The model with its parameters on the meta device (no memory) and its buffers (RoPE
        tables) computed as `from_pretrained` computes them; then the parameters outside the
        decoder layers are filled, and each layer's too unless they are streamed. Over several
        GPUs, accelerate decides where each decoder layer goes (`infer_auto_device_map` with
        balanced memory) and moves activations between them (`dispatch_model`)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=False)
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(
                config, attn_implementation=self.attn_implementation, **{dtype_kw: self.torch_dtype})
        if len(memory) > 1:
            import accelerate
            from accelerate.utils import compute_module_sizes

            # Each GPU but the last holds about an even share of the weights (the last what is
            # left), so that N GPUs asked for are N GPUs used, a tiny model's too. accelerate keeps
            # room for one decoder layer free on every GPU but the last: that room is added.
            sizes = compute_module_sizes(model, dtype=self.torch_dtype)
            layer = max(sizes[f"model.layers.{i}"] for i in range(len(model.model.layers)))
            share = -(-sizes[""] // len(memory)) + layer
            budget = {i: int(0.9 * b) if i == len(memory) - 1 else min(int(0.9 * b), share)
                      for i, b in enumerate(memory)}
            self.device_map = accelerate.infer_auto_device_map(
                model, max_memory=budget, no_split_module_classes=model._no_split_modules, dtype=self.torch_dtype)
        for module_name, module in model.named_modules():
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = b.to(self.device_of(f"{module_name}.{name}".lstrip(".")))
        self._weights = _WeightSource(self, model)
        self._weights.fill(self._weights.top_names())
        layers = model.model.layers
        if self.stream:
            for i, layer in enumerate(layers):
                layer.register_forward_pre_hook(lambda m, a, i=i: self._weights.fill(self._weights.layer_names(i)))
                layer.register_forward_hook(lambda m, a, o, i=i: self._weights.drop(self._weights.layer_names(i)))
        else:
            for i in range(len(layers)):
                self._weights.fill(self._weights.layer_names(i))
        if self.device_map is not None:
            import accelerate

            model = accelerate.dispatch_model(model, device_map=self.device_map)
        return model

    def patch_model(self, model):
        """Return the model to run. Subclasses (tests' mutants, porters' variants) change it here."""
        return model

    def run(self, tokens):
        return self._run(tokens, grad=False)

    def run_grad(self, tokens):
        """`run`'s points, the causal-LM loss (`loss`: cross-entropy of the text-vocabulary
        logits against the tokens shifted by one, mean over positions) and its gradients: at
        each point (a hook on the tensor the forward itself goes on with, its gradient given
        the point's own canonical transform) and of every weight (`named_parameters`, through
        `convert.from_hf`; a tied table is one tensor). `llmdiff/grad.py` names them."""
        if self.stream or self.devices > 1:
            raise RuntimeError("--grad runs the whole model on one device (not streamed or spread over GPUs)")
        return self._run(tokens, grad=True)

    def _run(self, tokens, grad: bool):
        import torch

        model = self.model
        taps, run = self._capture_taps()
        # Points are copied as they are taken in a --grad run, and those this model changed in
        # place after they were taken in an earlier forward (`_Batched`)
        copied = self.__dict__.setdefault("_points_changed_in_place", set())
        batch = _Batched(self, True if grad else copied) if self.sketching else None
        cap: dict = {}
        current = {"layer": None, "backward": False}
        grads: dict | None = {} if grad else None
        run.update(batch=batch, cap=cap, current=current, grads=grads)
        undo = taps.install()   # undone in the `finally` below, with everything else
        modeling, original_rope, rope_and_capture = taps.rope
        save, watch = taps.save, taps.watch
        modeling.apply_rotary_pos_emb = rope_and_capture
        per_prompt_norms = {}
        if grad:
            for p in model.parameters():
                p.requires_grad_(True)
                p.grad = None
            if self.sketching:  # each weight's gradient added to the batch's sum on the device, then freed
                undo += [h.remove for h in self._sum_gradients(per_prompt_norms)]
            if self.checkpointing:  # checkpointing acts in train mode (dropout as configured)
                model.train()
        try:
            with (self.phase("forward") if grad else contextlib.nullcontext()), \
                    (torch.enable_grad() if grad else torch.no_grad()), self._autocast():
                ids = torch.tensor([tokens], dtype=torch.long, device=self.device_of("model.embed_tokens"))
                text_vocab = min(self.spec.vocab_size or sys.maxsize, self.spec.hf_vocab_size or sys.maxsize)
                # HF's own loss too, where its logits are the text vocabulary's (evidence, in details)
                own = grad and text_vocab >= model.get_output_embeddings().weight.shape[0]
                out = model(input_ids=ids, use_cache=False, **({"labels": ids} if own else {}))
            text_vocab = min(text_vocab, out.logits.shape[-1])
            logits = out.logits[..., :text_vocab]
            save("logits", logits)
            watch("logits", logits)
            if grad:
                if own:
                    self._own_losses.append(float(out.loss))
                    last = len(self._own_losses) == len(self.job.tokens)   # the Trainer's step after the last
                elif list(tokens) == list(self.job.tokens[0]):
                    self._trainer = {"error": "no Trainer step: HF's logits are wider than the text vocabulary,"
                                              " so its own loss is not the compared one"}
                # Not `F`: that is the MLP width here, which Phi-3's slices read.
                loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
                current["backward"] = True
                with self.phase("backward"):
                    loss.backward()
                if own:
                    self._keep_norm_gradients(len(tokens) - 1, per_prompt_norms if self.sketching else None)
        finally:
            modeling.apply_rotary_pos_emb = original_rope
            for u in undo:
                u()
            run.clear()   # the callbacks hold nothing of this run once it is done
            if model.training:   # after a checkpointed --grad forward; skipped else: a call a module
                model.eval()
        host = batch.finish(pin=self.device == "cuda") if batch is not None else {}
        if batch is not None and batch.changed:   # sketched after the model changed them: again, copied
            copied |= batch.changed   # (never in a --grad run, whose points are all copies)
            return self._run(tokens, grad)
        for name, t in cap.items():  # logits in their own dtype (half the bytes in bfloat16), then float32
            t = t.cpu()
            host[name] = (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()
        if grad:
            with self.phase("gradients_to_host"):
                host.update(self._grads_to_host(grads, loss))
            self._grad_prompts += 1
            if self.sketching and self._grad_prompts % len(self.job.tokens) == 0:
                # The batch's sum, sketched and freed before the Trainer's step needs the memory
                from llmdiff.grad import WEIGHT

                with self.phase("weight_gradients_sketched"):
                    host.update(self._sketch_weights(WEIGHT, self._grad_sums))
                self._grad_sums = {}
            if self.checkpointing:  # the same backward with checkpointing off: LD608's counterfactual
                with self.phase("gradients_without_checkpointing"):
                    host.update(self._plain_gradients(ids, logits.shape[-1]))
            if own:
                with self.phase("own_loss"):
                    self._accumulate(ids)
                    if list(tokens) == list(self.job.tokens[0]):  # the whole batch's own-loss cases, once
                        host.update(self._loss_cases())
                if last:  # transformers' Trainer over every prompt, once
                    with self.phase("trainer_step"):
                        host.update(self._trainer_step())
        return host

    def _capture_taps(self):
        """The capture's callbacks on this model's modules (`_Taps`) and the dict they read the
        current run from (`_run` fills it): made once a model, not a run: their closures and
        module lookups were 1.5 ms a run on this project's CPU (gemma-7b's 28 layers at tiny
        widths, where the host is all there is: bench/hf_capture_parts.py --narrow)."""
        if self.__dict__.get("_taps") is not None:
            return self._taps
        import torch

        model = self.model
        layers = model.model.layers
        run: dict = {}

        def watch(name, t, transform=None):
            # The gradient of the tensor the forward goes on with (not of a reshaped copy,
            # which no later op reads), in the point's canonical layout.
            grads = run["grads"]
            if grads is None or not self.wants(name) or not t.requires_grad:
                return

            def keep(g):
                g = (transform(g) if transform else g).detach()
                if self.sketching:  # per position, on the device, as the point itself (llmdiff/sketch.py)
                    grads[name + ":sketch"] = self._sketch_rows(g.reshape(g.shape[0], g.shape[1], -1))
                else:
                    grads[name] = g
            t.register_hook(keep)

        def save(name, t):
            # Kept on the device until the forward is done: then one copy to the host, not one
            # synchronising copy per point in the middle of the forward.
            # Under gradient checkpointing the layers' forward runs again in the backward: the
            # points are the forward's, not the recompute's.
            if run["current"]["backward"] or not self.wants(name):
                return
            if t.requires_grad:
                t = t.detach()
            batch, cap = run["batch"], run["cap"]
            if batch is not None:  # sketched (llmdiff/sketch.py), in batches (`_Batched`)
                if name == "logits":  # the largest logits, values and ids (exact in their own dtype)
                    top = torch.topk(t, TOP_LOGITS, dim=-1)
                    cap["logits:top_values"], cap["logits:top_ids"] = top.values.float(), top.indices
                batch.add(name, t)
                return
            # A copy: the model may still change its own tensor in place after this hook.
            cap[name] = t if name == "logits" else t.to(torch.float64 if t.dtype == torch.float64 else torch.float32,
                                                       copy=True)

        def on_output(name, transform=None):
            def after(output):
                out = output[0] if isinstance(output, tuple) else output
                save(name, transform(out) if transform else out)
                watch(name, out, transform)
            return after

        def on_input(name):
            def before(args, kwargs):
                t = _first_tensor(args, kwargs, "hidden_states")
                save(name, t)
                watch(name, t)
            return before

        def heads(t):  # (B, T, K*H) -> (B, T, K, H)
            return t.reshape(*t.shape[:2], -1, self.spec.head_dim)

        N, K, H, F = self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim, self.spec.mlp_dim

        def fused_v(t):  # Phi-3's qkv_proj output: q, k, then v features
            return heads(t[..., (N + K) * H:])

        taps = _Taps()
        taps.before(layers[0], on_input("embed"))
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp

            def enter(args, kwargs, i=i):
                current = run["current"]
                current["layer"] = i
                if current["backward"] and self.checkpointing:  # a layer recomputed for the backward
                    self.checkpointing["recomputed_layers"] += 1
            taps.before(attn, enter)
            taps.after(layer.input_layernorm, on_output(f"L{i}.attn_norm"))
            taps.after(attn.o_proj, on_output(f"L{i}.attn_out"))
            if hasattr(attn, "qkv_proj"):  # Phi-3
                taps.after(attn.qkv_proj, on_output(f"L{i}.v", fused_v))
            else:
                taps.after(attn.v_proj, on_output(f"L{i}.v", heads))
            pre_mlp_norm = getattr(layer, "pre_feedforward_layernorm", None)
            if pre_mlp_norm is not None:  # Gemma 2/3: four norms per layer
                taps.after(layer.post_attention_layernorm, on_output(f"L{i}.post_attn_norm"))
                taps.after(layer.post_feedforward_layernorm, on_output(f"L{i}.post_mlp_norm"))
            else:
                # Gemma 1's `post_attention_layernorm` is the norm *before* the MLP: its input is
                # the residual after attention, its output the MLP's input.
                pre_mlp_norm = layer.post_attention_layernorm
            taps.before(pre_mlp_norm, on_input(f"L{i}.resid_mid"))
            taps.after(pre_mlp_norm, on_output(f"L{i}.mlp_norm"))
            taps.before(mlp.down_proj, on_input(f"L{i}.mlp_act"))
            taps.after(mlp, on_output(f"L{i}.mlp_out"))
            taps.after(layer, on_output(f"L{i}.out"))
            if hasattr(mlp, "gate_up_proj"):  # Phi-3: the gate features, then the up ones (its chunk(2))
                taps.after(mlp.gate_up_proj, on_output(f"L{i}.mlp_gate", lambda t: t[..., :F]))
                taps.after(mlp.gate_up_proj, on_output(f"L{i}.mlp_up", lambda t: t[..., F:]))
            else:
                taps.after(mlp.gate_proj, on_output(f"L{i}.mlp_gate"))
                taps.after(mlp.up_proj, on_output(f"L{i}.mlp_up"))
        taps.after(model.model.norm, on_output("final_norm"))

        modeling = sys.modules[type(layers[0].self_attn).__module__]
        original_rope = modeling.apply_rotary_pos_emb
        qk = [(f"L{i}.q", f"L{i}.k") for i in range(len(layers))]

        def rope_and_capture(q, k, *args, **kwargs):
            q_embed, k_embed = original_rope(q, k, *args, **kwargs)
            q_name, k_name = qk[run["current"]["layer"]]
            save(q_name, q_embed.transpose(1, 2))  # (B, N, T, H) -> (B, T, N, H)
            save(k_name, k_embed.transpose(1, 2))
            if run["grads"] is not None:
                watch(q_name, q_embed, lambda g: g.transpose(1, 2))
                watch(k_name, k_embed, lambda g: g.transpose(1, 2))
            return q_embed, k_embed

        taps.rope = (modeling, original_rope, rope_and_capture)
        taps.save, taps.watch = save, watch
        self._taps = (taps, run)
        return self._taps

    def _sum_gradients(self, norms: dict) -> list:
        """Sketched `--grad`: a hook on every parameter adds its gradient, once the backward has
        made it, to the batch's sum (float32, float64 in a float64 run: as `grad.combine` adds
        the prompts' on the host, in prompt order) and frees it, so the device holds the weights,
        the sum and the gradients in flight, never a second whole set. The norms' per-prompt
        gradients go to `norms` (`_keep_norm_gradients`). The hooks' handles."""
        import torch

        sums = self._grad_sums

        def add(p, n):
            g = p.grad.detach()
            if "norm" in n:
                norms[n] = g.to(torch.float64).cpu()
            g = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
            sums[n] = g if n not in sums else sums[n].add_(g)
            p.grad = None

        return [p.register_post_accumulate_grad_hook(lambda p, n=n: add(p, n))
                for n, p in self.model.named_parameters()]

    def _sketch_rows(self, x):
        """x (..., n) on the device -> (..., K + 1) float64 [x R, |x|^2] (`llmdiff/sketch.py`),
        rounded first to the dtype a float64 floor run measures, computed in `sketch.arithmetic`
        of the values' dtype."""
        import torch

        from llmdiff import sketch

        x = self._rounded(x)
        return self._project(x.to(getattr(torch, sketch.arithmetic(str(x.dtype).removeprefix("torch.")))))

    def _project(self, x, wide: bool = True):
        """x (rows, n) -> (rows, K + 1) [x R, |x|^2], computed in `sketch.arithmetic` of x's dtype
        and returned in float64, or (`wide=False`) in that arithmetic's dtype: float32 for 16-bit
        values, half the bytes to the host, nothing lost. 16-bit values on a GPU are not converted
        first: R's entries (+-1/8) are exact in 16 bits, and cuBLAS multiplies with float32
        accumulation and output (`_product`), the norm accumulating in float32 too: the same
        float32 arithmetic without writing and reading the values again at twice their size."""
        import torch

        from llmdiff import sketch

        dtype = getattr(torch, sketch.arithmetic(str(x.dtype).removeprefix("torch.")))
        if not (x.element_size() == 2 and x.is_cuda and _MM_OUT_DTYPE.get("cuda", True)):
            x = x.to(dtype)
        norm2 = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype) ** 2  # one kernel, not two
        product = _product(x, self._projection_on_device(x.shape[-1], x.device, x.dtype), dtype)
        out = torch.cat([product, norm2], -1)
        return out.to(torch.float64) if wide else out

    def _rounded(self, x):
        """x rounded to the dtype a float64 floor run measures (itself otherwise)."""
        import torch

        return x.to(getattr(torch, self.round_to)) if self.round_to else x

    def _sketch_weights(self, prefix: str, hf: dict) -> dict:
        """Weight gradients by HF parameter name (device tensors) in the canonical layout
        (`convert.from_hf`, views on the device), each sketched per row (1-D ones whole), and
        moved to the host in one copy: `PREFIX + NAME:sketch` (rows, K + 1) float64."""
        import torch

        from llmdiff import convert, sketch

        hf = dict(hf)
        for n, p in self.model.named_parameters():  # a parameter no loss reached: zeros, as whole
            if n not in hf:
                hf[n] = torch.zeros(p.shape, dtype=torch.float32 if p.dtype != torch.float64 else p.dtype,
                                    device=p.device)
        canon = convert.from_hf(self.spec, hf, "HF gradients")
        out, parts = {}, []
        for name, g in canon.items():
            if sketch.sketches_rows(g.shape):
                parts.append((prefix + name + sketch.SUFFIX, self._sketch_rows(g.reshape(g.shape[0], -1))))
            else:
                out[prefix + name] = g.detach().cpu().to(torch.float64 if g.dtype == torch.float64 else torch.float32
                                                          ).numpy()
        if parts:
            stacked = torch.cat([t for _, t in parts])
            host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=self.device == "cuda").copy_(stacked)
            host = host.numpy()
            start = 0
            for name, t in parts:
                out[name] = host[start:start + t.shape[0]]
                start += t.shape[0]
        return out

    def _keep_norm_gradients(self, targets: int, grads: dict | None = None):
        """Each prompt's gradient of its own mean loss for the norms' scales (small tensors),
        summed over prompts plain and weighted by the prompt's share of the batch's target
        tokens: what the Trainer's step gives for them if it normalises per micro-batch (the
        sum, or the sum over the accumulation steps) or over the whole batch (LD602's evidence)."""
        import torch

        share = targets / sum(len(t) - 1 for t in self.job.tokens)
        sums = self.__dict__.setdefault("_norm_grads", {"plain": {}, "whole_batch": {}})
        for n, p in self.model.named_parameters():
            g = grads.get(n) if grads is not None else p.grad
            if "norm" in n and g is not None:
                g = g.detach().to(torch.float64).cpu()
                sums["plain"][n] = sums["plain"].get(n, 0) + g
                sums["whole_batch"][n] = sums["whole_batch"].get(n, 0) + g * share

    def patch_trainer(self, trainer):
        """Return the Trainer to run (`_trainer_step`). Tests' mutants change it here."""
        return trainer

    def _trainer_step(self):
        """transformers' own `Trainer`, as fine-tuners run it: ONE optimizer step with
        `gradient_accumulation_steps` = the number of prompts, each prompt one micro-batch
        (`per_device_train_batch_size=1`, `labels` = the ids, in order: a sequential sampler),
        no gradient clipping. A pre-hook on the optimizer's step keeps each parameter's
        accumulated `.grad` and then drops it, so that the step changes no weight. Gives
        `loss:trainer` (the sum of `training_step`'s returns: what the Trainer adds up and logs
        for the step) and `grad:trainer:w:NAME` (through `convert.from_hf`). Where the Trainer
        cannot run, nothing: the reason, one line, is in `details["trainer"]["error"]`, and the
        compare reports it as an error."""
        import tempfile

        import torch

        from llmdiff import convert
        from llmdiff import grad as names

        prompts = self.job.tokens
        try:
            import transformers
            from transformers import Trainer, TrainingArguments
        except Exception as e:  # noqa: BLE001 - accelerate missing, an old release: said, not skipped
            self._trainer = {"error": f"transformers' Trainer cannot be imported: {type(e).__name__}: {e}".splitlines()[0]}
            return {}
        model, device = self.model, self.device_of("model.embed_tokens")
        kept: dict = {}
        adapter = self

        def keep_gradients(*_):
            for n, p in model.named_parameters():
                if adapter.sketching:  # no copy: the step's gradient is taken, and sketched below
                    kept[n] = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
                else:
                    kept[n] = (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                p.grad = None  # the optimizer then leaves every weight as it is

        class Sequential(Trainer):
            micro_batches: list = []

            def create_optimizer(self, *args, **kwargs):
                # The accumulated gradients as the optimizer gets them (after any clipping):
                # a hook on its step, which every release calls (the `on_pre_optimizer_step`
                # callback only exists from 4.46 on).
                optimizer = super().create_optimizer(*args, **kwargs)
                optimizer.register_step_pre_hook(keep_gradients)
                return optimizer

            def _get_train_sampler(self, *args, **kwargs):  # the prompts in order, whatever the release
                return torch.utils.data.SequentialSampler(self.train_dataset)

            def compute_loss_context_manager(self, *args, **kwargs):
                import contextlib

                stack = contextlib.ExitStack()
                stack.enter_context(super().compute_loss_context_manager(*args, **kwargs))
                stack.enter_context(adapter._autocast())
                return stack

            def training_step(self, *args, **kwargs):
                loss = super().training_step(*args, **kwargs)
                self.micro_batches.append(float(loss))
                return loss

        data = [{"input_ids": torch.tensor(t, dtype=torch.long), "labels": torch.tensor(t, dtype=torch.long)}
                for t in prompts]
        try:
            with tempfile.TemporaryDirectory() as out_dir:
                args = TrainingArguments(
                    output_dir=out_dir, per_device_train_batch_size=1, gradient_accumulation_steps=len(prompts),
                    max_steps=1, learning_rate=0.0, optim="sgd", weight_decay=0.0, max_grad_norm=0.0,
                    lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                    dataloader_num_workers=0, disable_tqdm=True, seed=0, use_cpu=str(device) == "cpu",
                    remove_unused_columns=False)  # a forward patched to (*args, **kwargs) keeps its ids
                trainer = self.patch_trainer(Sequential(model=model, args=args, train_dataset=data))
                trainer.micro_batches = []
                trainer.train()
        except Exception as e:  # noqa: BLE001 - the reason, in one line, instead of the points
            self._trainer = {"error": f"transformers' Trainer did not run: {type(e).__name__}: {e}".splitlines()[0]}
            return {}
        finally:
            model.eval()
            for p in model.parameters():
                p.grad = None
        if not kept:
            self._trainer = {"error": "transformers' Trainer made no optimizer step"}
            return {}
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        # The step's gradient of the norms' scales against HF's own per-prompt gradients put
        # together each way (relative L2): which normalisation the Trainer's gradient is.
        sums, k = getattr(self, "_norm_grads", {"plain": {}}), len(prompts)
        norms = sorted(sums["plain"])
        gradient_rel_l2 = None
        if norms:
            step = torch.cat([kept[n].to(torch.float64).cpu().reshape(-1) for n in norms])
            forms = {"the whole batch's": torch.cat([sums["whole_batch"][n].reshape(-1) for n in norms]),
                     "the sum of the micro-batches' means": torch.cat([sums["plain"][n].reshape(-1) for n in norms])}
            forms["the mean of the micro-batches' means"] = forms["the sum of the micro-batches' means"] / k
            gradient_rel_l2 = {f: float(torch.linalg.vector_norm(step - g) / torch.linalg.vector_norm(g))
                               for f, g in forms.items()}
        self._trainer = {
            "transformers": transformers.__version__, "gradient_accumulation_steps": len(prompts),
            "micro_batches": list(trainer.micro_batches), "loss": sum(trainer.micro_batches),
            "model_accepts_loss_kwargs": getattr(trainer, "model_accepts_loss_kwargs", None),
            "logged_loss": logged[0] if logged else None,
            "norm_gradient_rel_l2": gradient_rel_l2,
            # SGD at learning rate 0: no optimizer state (AdamW's would be two more copies of the
            # weights, 68 GB for gemma-7b in float32); the gradient is taken before the step
            "optimizer": "sgd, learning rate 0, no state",
            "gradient_kept": "sketched on the device" if self.sketching else "copied"}

        def host(t):
            return t.detach().cpu().to(torch.float64 if t.dtype == torch.float64 else torch.float32).numpy()

        out = {names.TRAINER: np.full((1, 1), self._trainer["loss"], np.float32)}
        if self.sketching:  # on the device, per row (`llmdiff/sketch.py`)
            out.update(self._sketch_weights(names.TRAINER_WEIGHT, kept))
            return out
        out.update({names.TRAINER_WEIGHT + n: g for n, g in convert.from_hf(
            self.spec, {n: host(g) for n, g in kept.items()}, "the Trainer's gradients").items()})
        return out

    def _loss_cases(self):
        """The model's own loss function on the whole batch (`llmdiff/grad.py` CASES, the oracle's
        `gemma_grad.loss_cases`): `model(ids, attention_mask=mask, labels=labels).loss` of the
        prompts right-padded into one batch (padding labelled -100), the same with each prompt's
        first half labelled -100, and the sum over prompts, each one micro-batch, of
        `model(ids, labels=ids, num_items_in_batch=N)` (N: the batch's target tokens)."""
        import torch

        from llmdiff import grad as names

        prompts = self.job.tokens
        device = self.device_of("model.embed_tokens")
        pad = self.spec.pad_id if self.spec.pad_id is not None else 0

        def t(a):
            return torch.from_numpy(a).to(device)

        ids, mask, labels = map(t, names.batch_labels(prompts, pad))
        masked = t(names.batch_labels(prompts, pad, ignore_prompt=True)[2])
        n = sum(len(p) - 1 for p in prompts)
        out = {}
        with torch.no_grad(), self._autocast():
            for name, lab in ((names.BATCH, labels), (names.IGNORED, masked)):
                out[name] = float(self.model(input_ids=ids, attention_mask=mask, labels=lab, use_cache=False).loss)
            try:
                out[names.ACCUMULATED] = sum(
                    float(self.model(input_ids=p, labels=p, use_cache=False,
                                     num_items_in_batch=torch.tensor(n, device=device)).loss)
                    for p in (torch.tensor([q], dtype=torch.long, device=device) for q in prompts))
            except TypeError:  # a release whose forward takes no `num_items_in_batch`: no such point
                pass
        return {k: np.full((1, 1), v, np.float32) for k, v in out.items()}

    def _accumulate(self, ids):
        """Gradient accumulation as users of transformers write it: each prompt one micro-batch,
        `model(ids, labels=ids, num_items_in_batch=N)`, N the target tokens of every prompt, so
        that the micro-batches' losses sum to the whole batch's (the Trainer's way since 4.46).
        Kept in `details` (`own_loss_accumulated`): LD602's evidence."""
        import torch

        n = sum(len(t) - 1 for t in self.job.tokens)
        try:
            with torch.no_grad(), self._autocast():
                out = self.model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(n, device=ids.device),
                                 use_cache=False)
            self._accumulated.append(float(out.loss))
        except TypeError as e:  # a release whose forward takes no `num_items_in_batch`
            self._accumulated_error = f"{type(e).__name__}: {e}".splitlines()[0]

    def _grads_to_host(self, grads, loss):
        """The loss and the gradients as `llmdiff/grad.py` names them, float32 numpy."""
        import torch

        from llmdiff import convert
        from llmdiff import grad as names

        def host(t):
            return t.detach().cpu().to(torch.float64 if t.dtype == torch.float64 else torch.float32).numpy()

        out = {names.LOSS: np.full((1, 1), float(loss), np.float32)}
        out.update({names.POINT + n: host(g) for n, g in grads.items()})
        if self.sketching:  # the weights' are summed over prompts on the device (`_sum_gradients`)
            return out
        hf = {n: host(p.grad if p.grad is not None else torch.zeros_like(p))
              for n, p in self.model.named_parameters()}
        out.update({names.WEIGHT + n: g for n, g in convert.from_hf(self.spec, hf, "HF gradients").items()})
        return out

    def _plain_gradients(self, ids, text_vocab: int) -> dict:
        """`--grad-checkpointing`'s counterfactual: the prompt's loss (as `_run` computes it) and
        its weight gradients with gradient checkpointing off (every layer's activations kept for
        the backward, nothing recomputed), in train mode like the checkpointed run, as
        `grad:plain:w:NAME` (`llmdiff/grad.py`; not compared, LD608's evidence). The parameters'
        `.grad` are cleared before and after."""
        import torch

        from llmdiff import convert
        from llmdiff import grad as names

        model = self.model
        checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
        for p in model.parameters():
            p.grad = None
        for m in checkpointed:
            m.gradient_checkpointing = False
        model.train()
        try:
            with torch.enable_grad(), self._autocast():
                logits = model(input_ids=ids, use_cache=False).logits[..., :text_vocab]
                torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).backward()
            if self.sketching:  # summed over prompts on the device, sketched after the last (`_sketch_weights`)
                sums = self.__dict__.setdefault("_plain_sums", {})
                for n, p in model.named_parameters():
                    g = (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
                    g = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
                    sums[n] = g if n not in sums else sums[n].add_(g)
                hf = None
            else:
                hf = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu().float().numpy()
                      for n, p in model.named_parameters()}
        finally:
            for m in checkpointed:
                m.gradient_checkpointing = True
            model.eval()
            for p in model.parameters():
                p.grad = None
        if hf is None:
            if self._grad_prompts % len(self.job.tokens):
                return {}
            return self._sketch_weights(names.PLAIN_WEIGHT, self.__dict__.pop("_plain_sums"))
        return {names.PLAIN_WEIGHT + n: g
                for n, g in convert.from_hf(self.spec, hf, "HF gradients without checkpointing").items()}

    def _autocast(self):
        """torch.autocast to the run's low dtype, or nothing."""
        import contextlib

        import torch

        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda" if self.device == "cuda" else "cpu", dtype=self.autocast)

    def _projection_on_device(self, n, device, dtype=None):
        import torch

        cache = self.__dict__.setdefault("_device_projections", {})
        dtype = dtype or torch.float64
        if (n, device, dtype) not in cache:
            cache[n, device, dtype] = torch.from_numpy(self.projection(n)).to(device, dtype)
        return cache[n, device, dtype]

    def run_bare(self, tokens):
        import torch

        with torch.no_grad(), self._autocast():
            ids = torch.tensor([tokens], dtype=torch.long, device=self.device_of("model.embed_tokens"))
            self.model(input_ids=ids, use_cache=False)
        self.sync()

    def sync(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def peak_device_bytes(self):
        import torch

        if self.device != "cuda":
            return None
        if self.devices > 1:
            return {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(self.devices)}
        return torch.cuda.max_memory_allocated()

    def describe(self):
        """What this implementation resolved to: evidence for static checks, not its version."""
        import torch

        model = self.model
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        embed = embed.to(head.device)  # over several GPUs the two tables may sit on two of them
        tied = head is embed or (head.shape == embed.shape and bool(torch.equal(head, embed)))
        details = {"attn_implementation": self.attn_implementation, "device": str(self.device), "devices": self.devices,
                   "streamed": self.stream,
                   "tied_lm_head": tied,
                   "activation": type(_activation(model.model.layers[0].mlp)).__name__}
        if not tied and head.shape == embed.shape:
            details["lm_head_max_abs_diff"] = float((head.float() - embed.float()).abs().max())
        if getattr(self, "_own_losses", None):  # --grad: `model(input_ids, labels=input_ids).loss` per prompt
            details["own_loss"] = list(self._own_losses)
            details["own_loss_accumulated"] = (
                {"error": self._accumulated_error} if self._accumulated_error else
                {"num_items_in_batch": sum(len(t) - 1 for t in self.job.tokens),
                 "micro_batches": list(self._accumulated)})
        if getattr(self, "_trainer", None):  # --grad: transformers' Trainer step, or why it did not run
            details["trainer"] = dict(self._trainer)
        if getattr(self, "checkpointing", None):  # --grad --grad-checkpointing
            details["grad_checkpointing"] = dict(self.checkpointing)
        return details


class _Batched:
    """The forward's points sketched in batches (`llmdiff/sketch.py`): each group of points of
    one device, width and dtype waits until `CHUNK` bytes of it do, or the forward ends, and is
    then sketched with one concatenation, one product and one norm (`_project`). A point waits
    as the model's own tensor, not a copy: a copy a point is a launch a point (339 a gemma-7b
    forward), and a bfloat16 capture is bound by the host (bench/RESULTS.md). A model may still
    change such a tensor in place after the point was taken: its version counter says so when the group is
    sketched, the point is named in `changed`, and `HFReference._run` runs the forward again
    with those points copied as they are taken (`copy`: their names, or every point). `finish`
    moves every sketch to the host in one copy a device and returns them by name (views of that
    copy: float32 sketches of 16-bit values, float64 others)."""

    CHUNK = 256 << 20   # bytes of one group waiting

    def __init__(self, reference, copy):
        import torch

        self.reference, self.copy = reference, copy   # copy: a set of point names, or True (all)
        round_to = reference.round_to
        self.round_to = getattr(torch, round_to) if round_to else None
        self.groups: dict = {}   # (device, width, dtype) -> [[(name, (rows, n) tensor, its version, (B, T))], bytes]
        self.done: list = []     # ((rows, K + 1) sketches, [(name, first row, (B, T))])
        self.order: list = []
        self.changed: set = set()

    def add(self, name: str, x) -> None:
        """x (B, T, ...) on the device: (B * T) vectors."""
        own = self.round_to is None and self.copy is not True and name not in self.copy
        if self.round_to is not None:
            x = x.to(self.round_to)   # a new tensor
        elif not own:
            x = x.clone()
        bt = (x.shape[0], x.shape[1])
        x = x.reshape(bt[0] * bt[1], -1)   # a view of the model's tensor where it is contiguous
        version = None   # of the model's own tensor (a view's is its base's); None: a copy
        if own:
            try:
                version = x._version
            except RuntimeError:   # an inference-mode tensor keeps no version counter: copied
                x = x.clone()
        key = (x.device, x.shape[1], x.dtype)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = [[], 0]
        group[0].append((name, x, version, bt))
        group[1] += x.numel() * x.element_size()
        self.order.append(name)
        if group[1] >= self.CHUNK:
            self._sketch(key)

    def _sketch(self, key) -> None:
        import torch

        items, _ = self.groups.pop(key)
        self.changed.update(name for name, x, version, _ in items if version is not None and x._version != version)
        whole = torch.cat([x for _, x, _, _ in items]) if len(items) > 1 else items[0][1]
        names, start = [], 0
        for name, x, _, bt in items:
            names.append((name, start, bt))
            start += x.shape[0]
        self.done.append((self.reference._project(whole, wide=False), names))

    def finish(self, pin: bool) -> dict:
        """Every point's sketch on the host, (B, T, K + 1), as `NAME:sketch`."""
        import torch

        from llmdiff import sketch

        for key in list(self.groups):
            self._sketch(key)
        by_device: dict = {}
        for done, names in self.done:
            by_device.setdefault(done.device, []).append((done, names))
        out = {}
        for parts in by_device.values():
            # Into page-locked memory: a copy from the GPU to ordinary (pageable) host memory
            # ran at 1.7 GB/s on an H200 machine, half the capture's time in bfloat16.
            whole = torch.cat([done for done, _ in parts]) if len(parts) > 1 else parts[0][0]
            host = torch.empty(whole.shape, dtype=whole.dtype, pin_memory=pin).copy_(whole).numpy()
            offset = 0
            for done, names in parts:
                for name, first, bt in names:
                    start = offset + first
                    out[name] = host[start:start + bt[0] * bt[1]].reshape(*bt, -1)
                offset += done.shape[0]
        self.done = []
        return {name + sketch.SUFFIX: out[name] for name in self.order}   # in the forward's order


class _Taps:
    """Callbacks around modules' forwards: `before(args, kwargs)` and `after(output)`, each
    module's forward wrapped once for all of its callbacks. Not torch's module hooks where it
    can help it: a module with one takes `Module.__call__`'s slow path (a few us a call). A module that has hooks
    of its own (a porter's `patch_model` may change an output with one; streaming fills and
    drops weights with them) gets torch hooks, registered after its own, so its callbacks see
    what the module gives, as before."""

    def __init__(self):
        self.modules: dict = {}   # module -> ([before], [after])
        self.wrappers: dict = {}  # module -> (put the wrapper in, take it out): made once

    def before(self, module, fn) -> None:
        self.modules.setdefault(module, ([], []))[0].append(fn)

    def after(self, module, fn) -> None:
        self.modules.setdefault(module, ([], []))[1].append(fn)

    def install(self) -> list:
        """Wrap every module's forward, or hook it; the callables that undo it."""
        from torch.nn.modules import module as torch_module

        global_hooks = any(getattr(torch_module, name, None) for name in (
            "_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called"))
        undo = []
        for m, (before, after) in self.modules.items():
            if global_hooks or m._forward_hooks or m._forward_pre_hooks:
                undo += _hook_forward(m, before, after)
                continue
            if m not in self.wrappers:
                self.wrappers[m] = _wrap_forward(m, before, after)
            put, take = self.wrappers[m]
            put()
            undo.append(take)
        return undo


def _hook_forward(module, before, after) -> list:
    """`_Taps`' callbacks as torch hooks (which return None: nothing changed)."""
    def pre_hook(_, args, kwargs):
        for fn in before:
            fn(args, kwargs)

    def hook(_, args, out):
        for fn in after:
            fn(out)
    return [module.register_forward_pre_hook(pre_hook, with_kwargs=True).remove,
            module.register_forward_hook(hook).remove]


def _wrap_forward(module, before, after):
    """(put, take): a wrapper of the module's forward that calls the callbacks around it, put
    into the instance's dict, and taken out (leaving the forward the instance had of its own,
    if any: accelerate's device hooks set one)."""
    own = module.__dict__.get("forward")
    inner = module.forward

    def forward(*args, **kwargs):
        for fn in before:
            fn(args, kwargs)
        out = inner(*args, **kwargs)
        for fn in after:
            fn(out)
        return out

    # Into the instance's dict: `Module.__setattr__` costs several us a call (and `model.eval()`
    # one a module, which is why `_run` calls it only after a training-mode forward).
    def put():
        module.__dict__["forward"] = forward

    def take():
        if own is None:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = own
    return put, take


def _product(x, R, dtype):
    """x @ R in `dtype`; for 16-bit x and R on a GPU, `torch.mm`'s float32 `out_dtype` (torch
    2.8+), or both converted first where that does not run."""
    import torch

    if x.dtype == dtype:
        return x @ R
    try:
        out = torch.mm(x, R, dtype)
        _MM_OUT_DTYPE["cuda"] = True
        return out
    except (TypeError, RuntimeError, NotImplementedError):   # an older torch
        _MM_OUT_DTYPE["cuda"] = False
    return x.to(dtype) @ R.to(dtype)


def _activation(mlp):
    """The MLP's activation module: `act_fn`, Phi-3's `activation_fn`."""
    return getattr(mlp, "act_fn", None) or mlp.activation_fn


@contextlib.contextmanager
def _parameters_on_meta():
    """Build a model whose parameters live on the meta device (no memory, no init) and whose
    buffers are computed as usual, as accelerate's `init_empty_weights(include_buffers=False)`:
    every parameter is moved to meta as it is registered, before its module initialises it."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


class _WeightSource:
    """The HF tensors of a skeleton model, by parameter name: made by llmdiff's seeded generator
    on the device (`llmdiff.weights.generate_torch`: the very bits every other implementation
    gets), or read from the checkpoint's safetensors files (memory-mapped, one tensor at a time)."""

    def __init__(self, adapter, model):
        self.adapter, self.model = adapter, model
        self.spec = adapter.spec
        self.source = adapter.job.weights
        self.files = {}
        if not self.source.generated:
            from pathlib import Path

            from llmdiff import checkpoint_files, safetensors_file

            hf_dir = Path(self.source.hf_dir)
            for f in checkpoint_files.weight_files(hf_dir).files:  # the files from_pretrained reads
                f = hf_dir / f
                for name in safetensors_file.read_header(f)[0]:
                    self.files[name] = f

    def top_names(self):
        return [n for n, _ in self.model.named_parameters(remove_duplicate=False) if ".layers." not in n]

    def layer_names(self, i):
        prefix = f"model.layers.{i}."
        return [n for n, _ in self.model.named_parameters() if n.startswith(prefix)]

    def _set(self, name, tensor):
        import torch

        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        module._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)

    def drop(self, names):
        import torch

        for name in names:
            p = self.model.get_parameter(name)
            self._set(name, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def fill(self, names):
        import torch

        adapter, dtype = self.adapter, self.adapter.torch_dtype
        # Tied: the spec says so for made weights; a checkpoint, by having no lm_head tensor.
        tied = "lm_head.weight" in names and (self.spec.tie_embeddings if self.source.generated
                                              else "lm_head.weight" not in self.files)
        names = [n for n in names if not (n == "lm_head.weight" and tied)]
        by_device: dict = {}  # each parameter made or read on the GPU its module is on
        for n in names:
            by_device.setdefault(adapter.device_of(n), []).append(n)
        for device, group in by_device.items():
            if self.source.generated:
                values = self._generated(group, dtype, device)
            else:
                values = {n: _to_torch(self._read(n)).to(device=device, dtype=dtype) for n in group}
            for name, value in values.items():
                self._set(name, value.contiguous())
        if tied:  # lm_head is the embedding table itself
            self.model.lm_head._parameters["weight"] = self.model.get_input_embeddings().weight

    def _read(self, name):
        from llmdiff import safetensors_file

        if name not in self.files:
            raise RuntimeError(f"{self.source.hf_dir}: no tensor {name!r} in the checkpoint")
        return safetensors_file.load(self.files[name], [name])[name]

    def _generated(self, names, dtype, device):
        import torch

        from llmdiff import convert, weights

        seed = self.source.seed
        shapes = convert.canonical_shapes(self.spec)

        def make(canon_name):
            return weights.generate_torch(self.spec, canon_name, shapes[canon_name], seed, device, dtype)

        out = {}
        layers = sorted({int(n.split(".")[2]) for n in names if n.startswith("model.layers.")})
        for i in layers:
            canon = {c: make(c) for c in convert.layer_names(self.spec, i)}
            out.update({k: v for k, v in convert.to_hf_layer(self.spec, i, canon).items() if k in names})
        if "model.norm.weight" in names:
            out["model.norm.weight"] = make("final_norm")
        rows = self.spec.hf_vocab_size or self.spec.vocab_size
        for hf_name, canon_name in (("model.embed_tokens.weight", "embed"), ("lm_head.weight", "lm_head")):
            if hf_name in names:
                table = make(canon_name)
                if rows <= table.shape[0]:
                    table = table[:rows]
                else:
                    table = torch.cat([table, table.new_zeros(rows - table.shape[0], table.shape[1])])
                out[hf_name] = table
        return out


def _to_torch(a):
    """A numpy array (bfloat16 through ml_dtypes too) as a CPU torch tensor."""
    import torch

    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))
