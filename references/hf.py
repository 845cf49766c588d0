"""Adapter for Hugging Face transformers (`GemmaForCausalLM`, `Gemma2ForCausalLM`, the
text-only `Gemma3ForCausalLM`), loaded the way users load it.

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
pre-MLP norm). Logits are kept over the ids a text token can take (`text_vocab_size`): Gemma 3
4B-27B checkpoints have 64 more rows than DeepMind's table.
"""

from __future__ import annotations

import sys

import numpy as np

from llmdiff.references.base import Reference

_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float64": "float64"}


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

    def versions(self):
        import torch
        import transformers

        return {"torch": torch.__version__, "transformers": transformers.__version__}

    def load(self, dtype, constants_dtype=None):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        torch_dtype = getattr(torch, _TORCH_DTYPES[dtype])
        # `dtype=` replaced `torch_dtype=` in transformers 4.56; older releases only know the latter.
        dtype_kw = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
        self.attn_implementation = self.options.get("attn", "eager")
        model = AutoModelForCausalLM.from_pretrained(
            self.job["weights"]["hf_dir"], attn_implementation=self.attn_implementation,
            **{dtype_kw: torch_dtype})
        model.eval()
        device = self.options.get("device", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: torch sees no GPU here")
        model.to(device)  # buffers too: RoPE's inv_freq keeps its float32 dtype through .to(device)
        self.device = device
        self.model = self.patch_model(model)

    def patch_model(self, model):
        """Return the model to run. Subclasses (tests' mutants, porters' variants) change it here."""
        return model

    def run(self, tokens):
        import torch

        model = self.model
        layers = model.model.layers
        cap: dict[str, np.ndarray] = {}
        current = {"layer": None}
        handles = []

        def save(name, t):
            cap[name] = t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32).cpu().numpy()

        def on_output(name, transform=None):
            def hook(module, args, output):
                out = output[0] if isinstance(output, tuple) else output
                save(name, transform(out) if transform else out)
            return hook

        def on_input(name):
            def hook(module, args, kwargs):
                save(name, _first_tensor(args, kwargs, "hidden_states"))
            return hook

        def heads(t):  # (B, T, K*H) -> (B, T, K, H)
            return t.reshape(*t.shape[:2], -1, model.config.head_dim)

        handles.append(layers[0].register_forward_pre_hook(on_input("embed"), with_kwargs=True))
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp

            def enter(module, args, kwargs, i=i):
                current["layer"] = i
            handles += [
                attn.register_forward_pre_hook(enter, with_kwargs=True),
                layer.input_layernorm.register_forward_hook(on_output(f"L{i}.attn_norm")),
                attn.v_proj.register_forward_hook(on_output(f"L{i}.v", heads)),
                attn.o_proj.register_forward_hook(on_output(f"L{i}.attn_out")),
            ]
            pre_mlp_norm = getattr(layer, "pre_feedforward_layernorm", None)
            if pre_mlp_norm is not None:  # Gemma 2/3: four norms per layer
                handles += [
                    layer.post_attention_layernorm.register_forward_hook(on_output(f"L{i}.post_attn_norm")),
                    layer.post_feedforward_layernorm.register_forward_hook(on_output(f"L{i}.post_mlp_norm")),
                ]
            else:
                # Gemma 1's `post_attention_layernorm` is the norm *before* the MLP: its input is
                # the residual after attention, its output the MLP's input.
                pre_mlp_norm = layer.post_attention_layernorm
            handles += [
                pre_mlp_norm.register_forward_pre_hook(on_input(f"L{i}.resid_mid"), with_kwargs=True),
                pre_mlp_norm.register_forward_hook(on_output(f"L{i}.mlp_norm")),
                mlp.gate_proj.register_forward_hook(on_output(f"L{i}.mlp_gate")),
                mlp.up_proj.register_forward_hook(on_output(f"L{i}.mlp_up")),
                mlp.down_proj.register_forward_pre_hook(on_input(f"L{i}.mlp_act"), with_kwargs=True),
                mlp.register_forward_hook(on_output(f"L{i}.mlp_out")),
                layer.register_forward_hook(on_output(f"L{i}.out")),
            ]
        handles.append(model.model.norm.register_forward_hook(on_output("final_norm")))

        modeling = sys.modules[type(layers[0].self_attn).__module__]
        original_rope = modeling.apply_rotary_pos_emb

        def rope_and_capture(q, k, *args, **kwargs):
            q_embed, k_embed = original_rope(q, k, *args, **kwargs)
            i = current["layer"]
            save(f"L{i}.q", q_embed.transpose(1, 2))  # (B, N, T, H) -> (B, T, N, H)
            save(f"L{i}.k", k_embed.transpose(1, 2))
            return q_embed, k_embed

        modeling.apply_rotary_pos_emb = rope_and_capture
        try:
            with torch.no_grad():
                ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
                out = model(input_ids=ids, use_cache=False)
            spec = self.job.get("spec", {})
            text_vocab = min(spec.get("vocab_size") or out.logits.shape[-1],
                             spec.get("hf_vocab_size") or out.logits.shape[-1])
            save("logits", out.logits[..., :text_vocab])
        finally:
            modeling.apply_rotary_pos_emb = original_rope
            for h in handles:
                h.remove()
        return cap

    def describe(self):
        """What this implementation resolved to: evidence for static checks, not its version."""
        import torch

        model = self.model
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        tied = head is embed or (head.shape == embed.shape and bool(torch.equal(head, embed)))
        details = {"attn_implementation": self.attn_implementation, "device": str(embed.device),
                   "tied_lm_head": tied,
                   "activation": type(model.model.layers[0].mlp.act_fn).__name__}
        if not tied and head.shape == embed.shape:
            details["lm_head_max_abs_diff"] = float((head.float() - embed.float()).abs().max())
        return details
