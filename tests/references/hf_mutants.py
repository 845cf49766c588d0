"""Buggy variants of the HF implementation, patched inside the tests (adapters by module:Class).

Each reproduces a real Gemma port bug on the transformers release installed here.
"""

from __future__ import annotations

import math
import os

from llmdiff.references.hf import HFReference


class ExactGelu(HFReference):
    """GeGLU with exact erf GELU instead of the tanh approximation (transformers 4.38.0)."""

    def patch_model(self, model):
        import torch

        for layer in model.model.layers:
            layer.mlp.act_fn = torch.nn.GELU(approximate="none")
        return model


class PythonFloatEmbedScale(HFReference):
    """Embeddings times sqrt(hidden) as a python float, not rounded to the compute dtype first."""

    def patch_model(self, model):
        import torch

        embed = model.model.embed_tokens
        scale = math.sqrt(model.config.hidden_size)

        def forward(input_ids):
            table = embed.weight
            return (torch.nn.functional.embedding(input_ids, table).float() * scale).to(table.dtype)

        embed.forward = forward
        return model


class CrashesInRun(HFReference):
    """A worker that dies hard (as a segfault or OOM kill would) in the middle of its work."""

    def run(self, tokens):
        os._exit(3)


class FailsToLoad(HFReference):
    def load(self, request):
        raise RuntimeError("CUDA out of memory (simulated)")


class NaNLogits(HFReference):
    """The last layer's output turns to NaN (an overflow, say)."""

    def patch_model(self, model):
        last = model.model.layers[-1]
        last.register_forward_hook(lambda m, a, out: (out[0] * float("nan"),) + tuple(out[1:])
                                   if isinstance(out, tuple) else out * float("nan"))
        return model


# --- Gemma 2 / 3 (patched on the transformers release installed here, 5.x) ------------------

class NoAttnSoftcap(HFReference):
    """Gemma 2 without the attention-logit soft-cap (SDPA/flash paths that cannot apply it)."""

    def patch_model(self, model):
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        return model


class SlidingWindowOnWrongLayers(HFReference):
    """Local and global layers swapped: the window on odd layers (Gemma 2 slides on even ones)."""

    def patch_model(self, model):
        flip = {"sliding_attention": "full_attention", "full_attention": "sliding_attention"}
        config = model.config
        config.layer_types = [flip[t] for t in config.layer_types]  # masks are picked by type
        for layer, kind in zip(model.model.layers, config.layer_types):
            layer.self_attn.layer_type = kind
            layer.self_attn.sliding_window = config.sliding_window if kind == "sliding_attention" else None
        return model


class SlidingWindowOffByOne(HFReference):
    """A window one key too wide: a key at distance `window` stays visible (`t - s <= window`)."""

    def patch_model(self, model):
        model.config.sliding_window += 1  # read by the sliding mask on every forward
        return model


class HeadDimQueryScale(HFReference):
    """q scaled by head_dim ** -0.5 instead of query_pre_attn_scalar ** -0.5 (Gemma 2/3 27B)."""

    def patch_model(self, model):
        for layer in model.model.layers:
            layer.self_attn.scaling = model.config.head_dim ** -0.5
        return model


class NoGlobalRopeScaling(HFReference):
    """Gemma 3 global layers without the linear RoPE scaling (a config that lost rope_scaling)."""

    def patch_model(self, model):
        rotary = model.model.rotary_emb
        factor = model.config.rope_parameters["full_attention"]["factor"]
        # HF's linear scaling divides inv_freq by the factor; multiplying back is exact (a power of 2).
        rotary.full_attention_inv_freq = rotary.full_attention_inv_freq * factor
        rotary.full_attention_original_inv_freq = rotary.full_attention_inv_freq.clone()
        return model


class NormWithoutPlusOne(HFReference):
    """Llama's RMSNorm on Gemma weights: times w, not (1 + w)."""

    def patch_model(self, model):
        import torch

        def forward(norm, x):
            out = norm._norm(x.float()) * norm.weight.float()
            return out.type_as(x)

        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.forward = forward.__get__(module)
        return model


class BFloat16InvFreq(HFReference):
    """`model.to(torch.bfloat16)` after loading: the RoPE `inv_freq` buffer becomes bfloat16."""

    def patch_model(self, model):
        import torch

        rotary = model.model.rotary_emb
        if next(model.parameters()).dtype == torch.bfloat16:
            rotary.inv_freq = rotary.inv_freq.to(torch.bfloat16)
        return model


class UntiedLmHead(HFReference):
    """An output projection that is a perturbed copy of the embedding, not the embedding."""

    def patch_model(self, model):
        import torch

        embed = model.get_input_embeddings().weight
        head = torch.nn.Linear(embed.shape[1], embed.shape[0], bias=False, dtype=embed.dtype)
        with torch.no_grad():
            head.weight.copy_(embed * 1.05)
        model.lm_head = head
        return model


class RopeInBFloat16(HFReference):
    """RoPE angles computed in bfloat16: positions and frequencies multiplied in the compute dtype
    (the `inv_freq @ position_ids` of early Gemma ports, run under bfloat16 autocast)."""

    def patch_model(self, model):
        import torch

        rotary = model.model.rotary_emb

        def forward(x, position_ids, *args, **kwargs):
            if x.dtype != torch.bfloat16:
                return type(rotary).forward(rotary, x, position_ids, *args, **kwargs)
            freqs = position_ids[..., None].to(torch.bfloat16) * rotary.inv_freq.to(torch.bfloat16)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

        rotary.forward = forward
        return model


class Hangs(HFReference):
    """A worker that never finishes loading (a deadlock, a stuck download)."""

    def load(self, request):
        import time

        time.sleep(600)


class SpawnsChildThenHangs(HFReference):
    """A worker that starts a child process (which inherits its output pipe), then hangs."""

    def load(self, request):
        import subprocess
        import time

        child = subprocess.Popen(["sleep", "600"])
        with open(os.environ["LLMDIFF_TEST_CHILD_PID"], "w") as f:
            f.write(str(child.pid))
        time.sleep(600)


class ExitsEarly(HFReference):
    """A worker that exits 0 before writing any result, saying nothing."""

    def load(self, request):
        os._exit(0)


# --- Llama 3, Qwen, Mistral ports --------------------------------------------------------------

class Llama3RopeScalingMissing(HFReference):
    """Llama 3.1's RoPE without its `llama3` frequency scaling (a port that ignores rope_scaling)."""

    def patch_model(self, model):
        import torch

        rotary = model.model.rotary_emb
        H = self.spec.head_dim
        plain = 1.0 / (self.spec.rope_base ** (torch.arange(0, H, 2, dtype=torch.int64).float() / H))
        rotary.inv_freq = plain.to(rotary.inv_freq.device)
        rotary.original_inv_freq = rotary.inv_freq
        return model


class Llama3LinearScaling(HFReference):
    """Llama 3.1's RoPE with every frequency divided by the scaling factor: `rope_type` read as
    plain linear scaling, the `llama3` bands (high frequencies kept, a blend between) ignored."""

    def patch_model(self, model):
        import torch

        rotary = model.model.rotary_emb
        H = self.spec.head_dim
        plain = 1.0 / (self.spec.rope_base ** (torch.arange(0, H, 2, dtype=torch.int64).float() / H))
        rotary.inv_freq = (plain / self.spec.rope_llama3[0]).to(rotary.inv_freq.device)
        rotary.original_inv_freq = rotary.inv_freq
        return model


class KvHeadsTiled(HFReference):
    """Grouped-query attention with the key/value heads tiled (`k.repeat(1, groups, 1, 1)`: query
    head h reads kv head h % kv_heads) instead of repeated in place (h // groups): a port that
    writes `repeat_kv` with `repeat` where `repeat_interleave` is meant."""

    def patch_model(self, model):
        import sys

        modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
        modeling.repeat_kv = lambda x, n_rep: x if n_rep == 1 else x.repeat(1, n_rep, 1, 1)
        return model


class QkvBiasDropped(HFReference):
    """Qwen2's q/k/v projections built without their biases (a Llama-style port)."""

    def patch_model(self, model):
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias = None
        return model


class QkNormMissing(HFReference):
    """Qwen3 without the per-head RMSNorm of q and k."""

    def patch_model(self, model):
        import torch

        for layer in model.model.layers:
            layer.self_attn.q_norm = torch.nn.Identity()
            layer.self_attn.k_norm = torch.nn.Identity()
        return model


class NormEps1e5(HFReference):
    """Every RMSNorm with Llama's 1e-5 whatever the config says (Qwen's is 1e-6)."""

    def patch_model(self, model):
        for module in model.modules():
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon = 1e-5
        return model


class SlidingWindowIgnored(HFReference):
    """Mistral 7B v0.1 with full causal attention: the window dropped by the attention path."""

    def patch_model(self, model):
        model.config.sliding_window = None
        return model


class SlidingMaskWithoutCausalNoSoftcap(HFReference):
    """Gemma 2 with two bugs on different kinds of layer: the sliding-window layers' mask keeps
    the window but lost its causal part (`t - s < window` alone: those layers see the future;
    global layers are right), and no layer soft-caps its attention logits. Eager attention."""

    def patch_model(self, model):
        import torch

        def local_mask(module, args, kwargs):
            hidden = kwargs["hidden_states"]
            T = hidden.shape[1]
            pos = torch.arange(T, device=hidden.device)
            visible = (pos[:, None] - pos[None, :]) < module.sliding_window
            kwargs["attention_mask"] = torch.where(visible, 0.0, torch.finfo(hidden.dtype).min).to(hidden.dtype)[None, None]
            return args, kwargs

        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
            if layer.self_attn.sliding_window:
                layer.self_attn.register_forward_pre_hook(local_mask, with_kwargs=True)
        return model


class RopeAnglesUnderAutocast(HFReference):
    """RoPE's `inv_freq @ position_ids` left under an active autocast (a port without HF's
    `torch.autocast(..., enabled=False)` around it): a matmul, so autocast runs it in bfloat16.
    Nothing changes outside autocast (there the product is float32)."""

    def patch_model(self, model):
        import torch

        rotary = model.model.rotary_emb

        def forward(x, position_ids, *args, **kwargs):
            inv_freq = rotary.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
            freqs = (inv_freq @ position_ids[:, None, :].float()).transpose(1, 2)   # autocast: bfloat16
            emb = torch.cat((freqs, freqs), dim=-1)
            scale = getattr(rotary, "attention_scaling", 1.0)
            return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)

        rotary.forward = forward
        return model


class HonoursHiddenAct(HFReference):
    """Gemma's MLP activation read from config.json's `hidden_act` as written, the way
    transformers 4.38.0 read it: google/gemma-7b's published "gelu" becomes exact GELU."""

    def patch_model(self, model):
        import json
        from pathlib import Path

        from transformers.activations import ACT2FN

        written = json.loads((Path(self.job.weights.hf_dir) / "config.json").read_text())
        for layer in model.model.layers:
            layer.mlp.act_fn = ACT2FN[written["hidden_act"]]
        return model


# --- Phi-3 ports -------------------------------------------------------------------------------

class LongropeLongFactorsAlways(HFReference):
    """Phi-3 128k's LongRoPE with the long factors whatever the sequence's length: llama.cpp picks
    them by the configured context (`n_ctx_per_seq > n_ctx_orig_yarn`), so a server started with a
    context past the original 4096 tokens runs every prompt with them."""

    def patch_model(self, model):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rotary = model.model.rotary_emb
        original = self.spec.rope_longrope[2]
        long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](model.config, rotary.inv_freq.device, seq_len=original + 1)
        # transformers swaps `original_inv_freq` (the short factors) in for sequences within the
        # original context: it holds the long ones instead.
        rotary.original_inv_freq = long_inv_freq
        rotary.inv_freq = long_inv_freq.clone()
        return model


class LongropeAttentionFactorIgnored(HFReference):
    """Phi-3 128k's LongRoPE without its attention factor on cos and sin (per-frequency scaling only)."""

    def patch_model(self, model):
        model.model.rotary_emb.attention_scaling = 1.0
        return model


class LongropeShortFactorsAlways(HFReference):
    """Phi-3 128k's LongRoPE with the short factors past the original context too (a port that
    reads `short_factor` only)."""

    def patch_model(self, model):
        rotary = model.model.rotary_emb
        rotary.long_inv_freq = rotary.original_inv_freq.clone()  # what transformers swaps in when long
        return model


# --- RoPE base, q/k norm order, a tied head (#17) ----------------------------------------------

class RopeThetaIgnored(HFReference):
    """RoPE with base 10000 whatever `rope_theta` says (Qwen's is 1000000, Llama 3's 500000), the
    model's RoPE scaling kept: a port that hard-codes the original base."""

    def patch_model(self, model):
        import copy

        import torch
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rotary = model.model.rotary_emb
        config = copy.deepcopy(model.config)
        config.rope_theta = 10_000.0
        params = getattr(config, "rope_parameters", None)
        if isinstance(params, dict):
            params["rope_theta"] = 10_000.0
        kind = (params or {}).get("rope_type") or "default"
        if kind == "default":
            H = self.spec.head_dim
            inv_freq = 1.0 / (10_000.0 ** (torch.arange(0, H, 2, dtype=torch.int64).float() / H))
        else:  # Llama 3's bands, computed from the wrong base as such a port computes them
            inv_freq, _ = ROPE_INIT_FUNCTIONS[kind](config, rotary.inv_freq.device)
        rotary.inv_freq = inv_freq.to(rotary.inv_freq.device)
        rotary.original_inv_freq = rotary.inv_freq
        return model


class QkNormAfterRope(HFReference):
    """Qwen3's q/k RMSNorm applied to the rotated q and k (after `apply_rotary_pos_emb`)."""

    def patch_model(self, model):
        import sys

        import torch

        current = {}
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.late_q_norm, attn.late_k_norm = attn.q_norm, attn.k_norm  # still submodules: moved with the model
            attn.q_norm, attn.k_norm = torch.nn.Identity(), torch.nn.Identity()
            attn.register_forward_pre_hook(lambda module, args, kwargs: current.update(attn=module), with_kwargs=True)
        modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
        original = modeling.apply_rotary_pos_emb

        def rope_then_norm(q, k, *args, **kwargs):  # (B, heads, T, H): the norm is over H alike
            q, k = original(q, k, *args, **kwargs)
            return current["attn"].late_q_norm(q), current["attn"].late_k_norm(k)

        modeling.apply_rotary_pos_emb = rope_then_norm
        return model


class TiedLmHead(HFReference):
    """Llama 3.1 8B's logits from the input embedding: a port that ties every head."""

    def patch_model(self, model):
        model.lm_head.weight = model.model.embed_tokens.weight
        return model


class QkNormAcrossHeads(HFReference):
    """Qwen3's q/k RMSNorm over every head at once (OLMo 2's layout), its (head_dim,) scale tiled."""

    def patch_model(self, model):
        import torch

        class AcrossHeads(torch.nn.Module):
            def __init__(self, norm):
                super().__init__()
                self.weight, self.eps = norm.weight, norm.variance_epsilon

            def forward(self, x):  # (B, T, heads, H), as Qwen3Attention calls it
                dtype = x.dtype
                xf = x.to(torch.float32)
                xf = xf * torch.rsqrt(xf.pow(2).mean(dim=(-2, -1), keepdim=True) + self.eps)
                return self.weight * xf.to(dtype)

        for layer in model.model.layers:
            layer.self_attn.q_norm = AcrossHeads(layer.self_attn.q_norm)
            layer.self_attn.k_norm = AcrossHeads(layer.self_attn.k_norm)
        return model


class NormBackwardDetached(HFReference):
    """Gemma's pre-MLP RMSNorm with its statistic detached: `x * rsqrt(mean(x^2) + eps).detach()`.
    The forward is bit for bit HF's; the backward drops the normaliser's own derivative (training
    parity, `compare --grad`): every gradient from the residual before that norm back is wrong."""

    def patch_model(self, model):
        import torch

        for layer in model.model.layers:
            norm = getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm
            norm._norm = lambda x, norm=norm: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps).detach()
        return model


class LossKwargsDropped(HFReference):
    """A forward that does not hand `num_items_in_batch` to its loss (transformers before 4.46,
    and model classes whose forward drops its `**kwargs`): each micro-batch's loss is its own
    mean, so accumulated micro-batches are not the whole batch's loss (LD602). Forward and
    gradients of one prompt are HF's."""

    def patch_model(self, model):
        forward = model.forward

        def without_loss_kwargs(*args, num_items_in_batch=None, **kwargs):
            return forward(*args, **kwargs)

        model.forward = without_loss_kwargs
        return model


def _own_loss(model, loss):
    """Give `model` the causal-LM loss function `loss(logits, shift_labels, num_items_in_batch)`
    (`shift_labels`: HF's labels padded by one -100 and shifted, (B, T); the function's
    `unshifted` attribute, when true, gets the labels as given instead), in place of
    `ForCausalLMLoss` (`PreTrainedModel.loss_function` returns `_loss_function` when set)."""
    import torch

    def loss_function(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **kwargs):
        if getattr(loss, "unshifted", False):
            shift_labels = labels
        elif shift_labels is None:
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        return loss(logits.float(), shift_labels.to(logits.device), num_items_in_batch)

    model._loss_function = loss_function
    return model


class LossMeanOverPadding(HFReference):
    """The loss a mean over every label position of the batch, padded and ignored ones too
    (`cross_entropy(..., reduction="none").mean()`: ignored positions add 0 but are counted);
    with `num_items_in_batch` the sum over it, as HF. One prompt alone, with nothing to ignore,
    is HF's loss: only the padded batch and the masked prompt halves see it (LD603)."""

    def patch_model(self, model):
        import torch

        def loss(logits, labels, n):
            per = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    ignore_index=-100, reduction="none")
            return per.sum() / n if n is not None else per.mean()

        return _own_loss(model, loss)


class LabelsNotShifted(HFReference):
    """The loss compares the logits at position t with the label at t (the shift forgotten,
    a loss written for labels the data pipeline already shifted): LD604."""

    def patch_model(self, model):
        import torch

        def loss(logits, labels, n):   # the labels as given: position t scored against token t
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum" if n is not None else "mean") \
                / (n if n is not None else 1)

        loss.unshifted = True
        return _own_loss(model, loss)


class LabelsShiftedTwice(HFReference):
    """Labels shifted by the data pipeline and again by the model: position t is scored against
    the token at t + 2 (LD605)."""

    def patch_model(self, model):
        import torch

        def loss(logits, shift_labels, n):
            labels = torch.nn.functional.pad(shift_labels, (0, 1), value=-100)[..., 1:]   # one more shift
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum" if n is not None else "mean") \
                / (n if n is not None else 1)

        return _own_loss(model, loss)


class LossBeforeFinalSoftcap(HFReference):
    """Gemma 2's loss computed on the output head's raw product, before the final logit
    soft-cap that the returned logits have (LD606). Forward and the compared gradients (of the
    returned logits) are HF's."""

    def patch_model(self, model):
        import torch

        raw = {}
        model.lm_head.register_forward_hook(lambda m, a, out: raw.__setitem__("logits", out))

        def loss(logits, labels, n):
            x = raw["logits"].float()
            return torch.nn.functional.cross_entropy(x.reshape(-1, x.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum" if n is not None else "mean") \
                / (n if n is not None else 1)

        return _own_loss(model, loss)


# --- a window switched off, applied anyway; llama.cpp's F16 GELU table (#17, #24) --------------

class DisabledSlidingWindowApplied(HFReference):
    """Qwen 2.5 with the window its config.json carries but switches off (`use_sliding_window:
    false`) on every layer: a port that reads `sliding_window` alone, as config.json writes it
    (transformers' Qwen2Config itself drops it: `sliding_window if use_sliding_window else None`)."""

    def patch_model(self, model):
        import json
        from pathlib import Path

        window = json.loads((Path(self.job.weights.hf_dir) / "config.json").read_text())["sliding_window"]
        config = model.config
        config.sliding_window = window                      # read by the sliding mask
        config.layer_types = ["sliding_attention"] * config.num_hidden_layers   # masks are picked by type
        model.model.has_sliding_layers = True
        for layer in model.model.layers:
            layer.self_attn.layer_type = "sliding_attention"
            layer.self_attn.sliding_window = window
        return model


class GeluF16Table(HFReference):
    """Gemma's GeGLU with llama.cpp's CPU GELU (ggml/src/ggml-cpu/vec.h, GGML_GELU_FP16): a
    65536-entry table of the float32 tanh GELU of every float16 number, rounded to float16, read
    at the float16 rounding of the input; 0 at x <= -10 and x at x >= 10."""

    def patch_model(self, model):
        import torch

        f = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
        # ggml_gelu_f32, float32 op by op, of every float16 number, by bit pattern (+ 2**15)
        table = (0.5 * f * (1.0 + torch.tanh(0.7978845608028654 * f * (1.0 + 0.044715 * f * f)))).half()

        class F16TableGelu(torch.nn.Module):
            def forward(self, x):
                xf = x.float()
                bits = xf.half().view(torch.int16).to(torch.int64) + 2 ** 15
                looked_up = table.to(x.device)[bits].float()
                return torch.where(xf <= -10, torch.zeros_like(xf), torch.where(xf >= 10, xf, looked_up)).to(x.dtype)

        for layer in model.model.layers:
            layer.mlp.act_fn = F16TableGelu()
        return model


# --- the backward of RMSNorm (#23): a custom autograd function, as fused-kernel ports have -----

def _norm_backward(model, projection_without_eps=False):
    """Every RMSNorm of `model` (the modules whose class name ends in RMSNorm) made a custom
    autograd function: the forward is the module's own, bit for bit; the backward recomputes the
    norm from its saved input and weight and differentiates that in float32 (as HF's upcast
    forward differentiates) and, with `projection_without_eps`, with the
    projection term of d/dx written as x * mean(x * g) / mean(x^2) with no epsilon (a kernel
    that divides by the RMS it recomputes)."""
    import torch

    class Norm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, module, original):
            ctx.save_for_backward(x, weight)
            ctx.module = module
            return original(x)

        @staticmethod
        def backward(ctx, g):
            x, weight = ctx.saved_tensors
            m = ctx.module
            dt = torch.float32
            eps = getattr(m, "variance_epsilon", None) or getattr(m, "eps", 1e-6)
            plus_one = type(m).__name__.startswith("Gemma")
            with torch.enable_grad():
                xd, wd = x.detach().to(dt).requires_grad_(), weight.detach().to(dt).requires_grad_()
                ms = xd.pow(2).mean(-1, keepdim=True)
                r = torch.rsqrt(ms + eps)
                if projection_without_eps:
                    # d/dx [x r] = r g - x r mean(x g) / mean(x^2): the last factor's eps dropped
                    y = (wd + 1 if plus_one else wd) * (xd * r).detach()
                    gw, = torch.autograd.grad(y, (wd,), g.to(dt))
                    gn = (g.to(dt) * (wd + 1 if plus_one else wd)).detach()
                    gx = r * gn - xd.detach() * r * (xd.detach() * gn).mean(-1, keepdim=True) / ms.detach()
                else:
                    y = (xd * r) * (wd + 1 if plus_one else wd)
                    gx, gw = torch.autograd.grad(y, (xd, wd), g.to(dt))
            return gx.to(x.dtype), gw.to(weight.dtype), None, None

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None:
            original = module.forward
            module.forward = lambda x, module=module, original=original: Norm.apply(x, module.weight, module, original)
    return model


class NormBackwardDividesByRms(HFReference):
    """RMSNorm's backward (a custom autograd function; the forward HF's bit for bit) writes the
    projection term of d/dx as x * mean(x * g) / mean(x^2), the epsilon left out: at a row of
    zeros (an untrained embedding row: Llama 3 base's reserved special tokens) it is 0 / 0, NaN,
    and at a near-zero row mean(x^2) underflows to 0 (Inf); elsewhere it is HF's gradient to
    within eps / mean(x^2) of a term D times smaller than the gradient."""

    def patch_model(self, model):
        return _norm_backward(model, projection_without_eps=True)


class TrainerLossPerMicroBatch(HFReference):
    """transformers' Trainer as it was before 4.46 (PR 34191): it passes no
    `num_items_in_batch` to the model, so each micro-batch's loss is its own mean, and divides
    it by the accumulation steps: the step's loss and gradient are the mean of the
    micro-batches' means, not the whole batch's token-weighted ones (LD602 at loss:trainer).
    Forward, per-prompt gradients and the model's own loss cases are HF's."""

    def patch_trainer(self, trainer):
        trainer.model_accepts_loss_kwargs = False
        return trainer


class TrainerCountsUnshiftedLabels(HFReference):
    """transformers' Trainer as 4.46.2 was: `num_items_in_batch` counts every label that is not
    -100 before the shift, each sequence's first one too (5.24 counts `labels[..., 1:]` where
    the model's loss shifts; telling it the loss does not shift makes it count them all)."""

    def patch_trainer(self, trainer):
        trainer._loss_shifts_labels = False
        return trainer


class TrainerCannotRun(HFReference):
    """A release whose Trainer cannot make its step here (an old accelerate, a missing extra)."""

    def patch_trainer(self, trainer):
        raise RuntimeError("this Trainer needs accelerate>=0.26.0")


class KvRoundedToF16(HFReference):
    """K and V rounded to float16 before attention, everything else float32: a float16 KV cache
    in a float32 model (llama.cpp's flash attention casts an F32 cache's K and V to F16). The
    attention function the modeling module looks up (eager or SDPA) gets K and V rounded; q, k
    and v as captured (after RoPE) are the model's own."""

    def patch_model(self, model):
        import sys

        import torch

        modeling = sys.modules[type(model.model.layers[0].self_attn).__module__]
        functions = modeling.ALL_ATTENTION_FUNCTIONS

        class RoundingInterface:
            def get_interface(self, name, default):
                attend = functions.get_interface(name, default)

                def rounded(module, query, key, value, *args, **kwargs):
                    return attend(module, query, key.to(torch.float16).to(key.dtype),
                                  value.to(torch.float16).to(value.dtype), *args, **kwargs)
                return rounded

            def __getattr__(self, attr):
                return getattr(functions, attr)

        modeling.ALL_ATTENTION_FUNCTIONS = RoundingInterface()
        return model


# --- gradient checkpointing (#23): a recompute that differs from the forward ------------------

class CheckpointRecomputeUnderAutocast(HFReference):
    """Gradient checkpointing (`--grad-checkpointing`) through a checkpoint function that does
    not carry the forward's autocast state into its recompute: each layer's forward runs as the
    model's (no autocast in a float32 run), its recompute for the backward under
    `torch.autocast(bfloat16)`, the state around `backward()` in a loop that calls it inside
    the autocast region. A reentrant checkpoint (forward under no_grad, the layer run again with
    grad in the backward: torch's `use_reentrant=True`, Megatron's and DeepSpeed's own), so no
    recompute check of dtypes stands in its way; the forward is HF's bit for bit."""

    def recompute(self, model, function, args):
        import torch

        with torch.autocast(device_type=args[0].device.type, dtype=torch.bfloat16):
            return function(*args)

    def patch_model(self, model):
        import torch
        from torch.utils.checkpoint import checkpoint

        def checkpoint_differently(function, *args, **kwargs):
            def run(*a):
                if torch.is_grad_enabled():   # the recompute: the reentrant forward runs under no_grad
                    return self.recompute(model, function, a)
                return function(*a)
            return checkpoint(run, *args, use_reentrant=True, **kwargs)

        if not getattr(self, "checkpointing", None):
            raise RuntimeError(f"{type(self).__name__} patches gradient checkpointing:"
                               " run it with --grad --grad-checkpointing")
        for layer in model.model.layers:
            layer._gradient_checkpointing_func = checkpoint_differently
        return model


class CheckpointRecomputeWithDropout(CheckpointRecomputeUnderAutocast):
    """The recompute with attention dropout on (p = 0.1) where the forward has the model's
    (0): a dropout state the forward did not have, as a model switched to train mode between a
    step's forward and its backward, or a recompute that draws its own dropout mask."""

    def recompute(self, model, function, args):
        attns = [layer.self_attn for layer in model.model.layers]
        kept = [a.attention_dropout for a in attns]
        for a in attns:
            a.attention_dropout = 0.1
        try:
            return function(*args)
        finally:
            for a, p in zip(attns, kept):
                a.attention_dropout = p
