from llmdiff.check import AuditCheck


class RemoteCodeInCheckpoint(AuditCheck):
    """## What it finds
    Code that loading the checkpoint would run: an `auto_map` in config.json or
    tokenizer_config.json (transformers' `trust_remote_code`), and Python files in the
    directory. They are reported by name; nothing is imported or executed.

    ## Why it matters
    `trust_remote_code=True` runs the checkpoint's Python with the user's rights; the code may
    also implement the model differently from the library's own class, so a "Gemma"
    checkpoint may not run Gemma.

    ## How it is confirmed
    Static: the JSON files' `auto_map` keys and `*.py` file names.

    ## Fix
    Use the library's own architecture (remove `auto_map`, set `model_type` and
    `architectures` to the built-in class); read any custom code before trusting it.

    ## References
    huggingface/transformers "Customizing models" and the `trust_remote_code` documentation.
    """

    code = "LD714"
    name = "remote-code-in-checkpoint"

    def run(self, ctx):
        for source, data in (("config.json", ctx.config), ("tokenizer_config.json", ctx.tokenizer_config)):
            auto_map = (data or {}).get("auto_map")
            if auto_map:
                targets = auto_map if isinstance(auto_map, dict) else {"auto_map": auto_map}
                yield self.finding(ctx, f"{source}:auto_map", f"{source} asks to run remote code: "
                                   + ", ".join(f"{k} -> {v}" for k, v in sorted(targets.items(), key=str)),
                                   {"auto_map": auto_map})
        code = ctx.files.get("code") or []
        if code:
            yield self.finding(ctx, code[0], f"{len(code)} Python files in the checkpoint ({', '.join(code[:5])})",
                               {"files": code})
