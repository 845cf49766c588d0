from llmdiff.check import AuditCheck


class SafetensorsFileCorrupt(AuditCheck):
    """## What it finds
    safetensors files whose header is not valid, whose tensors' offsets overlap, leave holes,
    run past the end of the file (a truncated download) or leave bytes after the last tensor,
    and a shard index (`model.safetensors.index.json`) that names missing shards or tensors
    that are not where it says.

    ## Why it matters
    An interrupted download or copy leaves a file that loads until the first tensor past the
    cut; a wrong index makes transformers miss tensors and initialise them at random.

    ## How it is confirmed
    Static: each file's 8-byte header length, its JSON header and every tensor's
    `data_offsets` against the file size; the index against the shards' headers. Nothing past
    the header is needed to find these.

    ## Fix
    Re-download or re-save the named file (`huggingface-cli download --force-download`), and
    compare its size with the one the hub lists.

    ## References
    The safetensors format (huggingface/safetensors README, "Format").
    """

    code = "LD712"
    name = "safetensors-file-corrupt"

    def run(self, ctx):
        for name in sorted(ctx.file_errors):
            problems = ctx.file_errors[name]
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            yield self.finding(ctx, name, f"{problems[0]}{more}", {"problems": problems,
                               "unreadable": name in ctx.files.get("unreadable", [])})
