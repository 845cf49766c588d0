"""Where the oracle's sketched capture spends its time (issue #19: bfloat16 capture 3.4x a bare
forward at gemma-7b / 512 tokens), measured by taking it apart on a GPU.

    python bench/oracle_capture_parts.py --out DIR [--model gemma-7b] [--tokens 512] [--dtype bfloat16]

In one worker-like process (the oracle adapter, random weights made on the device, one prompt)
it times, fastest of three after a warm-up, each a whole forward through `gemma.forward_blocks`:
  bare        logits only (`run_bare`: what the capture is measured against);
  sketch      llmdiff's sketched capture as `run` does it, on the device only (every output
              ready, nothing moved);
  run         `run` itself: the same, then the sketches stacked and moved to page-locked host memory;
and, each a change to the step's sketch (monkeypatched; not llmdiff's code):
  convert_first  16-bit values converted to float32 before the product (what the step did
                 before the product took them as they are, accumulating in float32).
(Earlier variants, per point in float32, the product alone, the norm alone, and the grouping
by width that the step now has, are in bench/RESULTS.md's section "The sketched capture in
bfloat16".)
It writes DIR/oracle-capture-parts.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def variants():
    import jax.numpy as jnp

    from llmdiff import sketch

    def convert_first(x, R, round_to, wide=True):
        if round_to:
            x = x.astype(round_to)
        dtype = sketch.arithmetic(str(x.dtype))
        x = x.astype(dtype)
        out = jnp.concatenate([x @ R.astype(dtype), jnp.sum(x * x, axis=-1, keepdims=True)], axis=-1)
        return out.astype(jnp.float64) if wide else out

    return {"convert_first": convert_first}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="gemma-7b")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny model (a smoke test on the CPU)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from llmdiff import inputs, weights
    from llmdiff.job import Job, Options, RunId, RunRequest, WeightsSource
    from llmdiff.references import gemma, oracle
    from llmdiff.spec import get_spec

    spec = get_spec(args.model, tiny=args.tiny)
    work = Path(tempfile.mkdtemp(prefix="llmdiff-bench-"))
    hf_dir = weights.write_hf_config(work / "hf-config", spec)
    ids = inputs.synthetic_prompts(spec, 0, (args.tokens,))[0]
    job = Job(spec=spec.to_dict(), tokens=[ids], options=Options(device=args.device, stream=False),
              weights=WeightsSource(hf_dir=str(hf_dir), seed=0), capture="sketch")
    adapter = oracle.OracleReference(job)
    request = RunRequest(RunId(args.dtype), str(work / "run"), job.options)
    adapter.begin(request)
    t = time.perf_counter()
    adapter.load(request)
    load_s = time.perf_counter() - t

    def device_only():
        reduce, aux = adapter._reducer()
        caps = gemma.forward_blocks(adapter._layer, adapter.top, jnp.asarray([ids], jnp.int32), spec,
                                    adapter.precision, reduce=reduce, aux=aux)
        jax.block_until_ready(caps)

    def fastest(f):
        t = time.perf_counter()
        f()   # compiles
        first = time.perf_counter() - t
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
        return {"s": round(best, 4), "first_s": round(first, 2)}

    rows = {"bare": fastest(lambda: adapter.run_bare(ids)), "sketch": fastest(device_only),
            "run": fastest(lambda: adapter.run(ids))}
    original = oracle._sketch_rows
    for name, fn in variants().items():
        oracle._sketch_rows = fn
        jax.clear_caches()   # the steps' cache keys do not see the swap: traced again
        try:
            rows[name] = fastest(device_only)
        finally:
            oracle._sketch_rows = original
    bare = rows["bare"]["s"]
    for r in rows.values():
        r["x_bare"] = round(r["s"] / bare, 2)
    out = {"model": args.model, "tokens": args.tokens, "dtype": args.dtype, "load_s": round(load_s, 1),
           "device": str(jax.devices()[0]), "jax": jax.__version__, "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"oracle-capture-parts-{args.dtype}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
