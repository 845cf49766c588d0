from llmdiff.check import ALL_FAMILIES
from llmdiff.grad_check import GradCheck


class NormBackwardInComputeDtype(GradCheck):
    """## What it finds
    RMSNorm's backward computed in the compute dtype (bfloat16) while its forward upcasts to
    float32: a custom autograd function or fused kernel (Triton, CUDA) whose forward matches the
    reference but whose backward recomputes the statistics and the product in bfloat16 instead
    of differentiating the float32 forward and rounding once.

    ## Why it matters
    The forward is bit for bit the reference's, so every inference test passes; only training
    sees the extra roundings, at every norm of every layer, in the gradient flowing into the
    residual stream and in the norms' weight gradients. Fine-tuning then runs on noisier
    gradients than the model was meant to, and a port's training curves differ from the
    reference's for no visible reason.

    ## How it is confirmed
    Dynamic, `--grad` and bfloat16 only: the forward, the loss and the gradients down to the
    last norm's output are at parity, and the gradient at that norm's input diverges first;
    re-running the oracle's `--grad` run with `norm_backward="compute"` (every norm's backward
    recomputed and differentiated in bfloat16, the forward unchanged) brings it back under its
    noise floor (`llmdiff/grad_check.py`).

    ## Fix
    Differentiate the float32 forward: in a custom autograd function, upcast the saved input and
    weight to float32 in the backward, compute `dx` and `dw` there, and round once to the input
    dtype (HF's `x.to(float32)` forward gets this from autograd).

    ## References
    transformers `LlamaRMSNorm` / `GemmaRMSNorm` (float32 upcast); Liger-Kernel and Unsloth
    fused RMSNorm kernels (float32 accumulation in the backward).
    """

    code = "LD608"
    name = "norm-backward-in-compute-dtype"
    families = ALL_FAMILIES
    dtypes = ("bfloat16",)
    grad_knob = ("norm_backward", "compute")
