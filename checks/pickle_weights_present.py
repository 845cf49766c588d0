from llmdiff.check import AuditCheck


class PickleWeightsPresent(AuditCheck):
    """## What it finds
    Pickled weight files (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`, `*.pkl`) in the checkpoint.
    The audit reports them by name and size and never opens them.

    ## Why it matters
    Unpickling runs arbitrary code: `torch.load` of a hostile `.bin` executes its payload
    (`weights_only=True` narrows but has had bypasses). A checkpoint with only pickles cannot
    be audited or loaded safely; one with both may be loaded from the pickle by older tools.

    ## How it is confirmed
    Static: file names in the directory. Nothing is read from them.

    ## Fix
    Publish safetensors only: convert in a sandbox (`safetensors` convert script or
    `save_pretrained(safe_serialization=True)`), then delete the pickles.

    ## References
    huggingface/safetensors README ("Why not pickle"); PyTorch `torch.load` security notes.
    """

    code = "LD713"
    name = "pickle-weights-present"

    def run(self, ctx):
        pickles = ctx.files.get("pickle") or []
        if not pickles:
            return
        sizes = {p: (ctx.path / p).stat().st_size for p in pickles}
        if ctx.files.get("safetensors"):
            message = (f"{len(pickles)} pickle files next to the safetensors ({pickles[0]}): never loaded;"
                       " tools that prefer them would run their code")
        else:
            message = (f"the checkpoint holds only pickle weights ({pickles[0]}): never unpickled, so its"
                       " weights were not audited; convert to safetensors in a sandbox")
        yield self.finding(ctx, pickles[0], message, {"files": sizes})
