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
    def load(self, dtype, constants_dtype=None):
        raise RuntimeError("CUDA out of memory (simulated)")


class NaNLogits(HFReference):
    """The last layer's output turns to NaN (an overflow, say)."""

    def patch_model(self, model):
        last = model.model.layers[-1]
        last.register_forward_hook(lambda m, a, out: (out[0] * float("nan"),) + tuple(out[1:])
                                   if isinstance(out, tuple) else out * float("nan"))
        return model
