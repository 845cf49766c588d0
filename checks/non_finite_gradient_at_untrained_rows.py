from llmdiff.check import ALL_FAMILIES
from llmdiff.grad_check import GradEvidenceCheck

# A prompt token whose embedding (the `embed` point, as the model reads it) is under this
# fraction of the prompt's median embedding norm reads an untrained row (LD102's threshold).
RELATIVE_NORM = 0.1
SHOWN = 20


class NonFiniteGradientAtUntrainedRows(GradEvidenceCheck):
    """## What it finds
    A backward that gives NaN or infinite gradients where the oracle's are finite, starting at
    the positions of prompt tokens whose embedding rows are zero or nearly so: a norm whose
    backward divides by the RMS of its input without the epsilon the forward adds (a custom
    autograd function or fused kernel that recomputes `1 / rms`, or writes the projection term
    as `x * mean(x * g) / mean(x^2)`). At a zero row that is 0 / 0; at a near-zero row
    `mean(x^2)` underflows to 0 and the quotient is infinite.

    ## Why it matters
    Untrained rows are common: Llama 3 base's reserved special tokens (its chat-template tokens
    among them) have rows of zeros or near zeros. Fine-tuning with a template that uses them
    then gives NaN gradients at the first step, and one NaN update of the embedding table (or of
    any weight the NaN reaches) ruins the model. The forward is finite and correct (the epsilon
    is there), so inference tests pass and only the backward sees it.

    ## How it is confirmed
    Dynamic, `--grad` only, from the run's own numbers (no counterfactual: no knob brings a NaN
    under a floor): walking back from the loss, the first gradient point with values that are
    NaN or infinite where the oracle's (and its float64 answer's) are finite has them only at
    positions whose prompt token reads an embedding row under 0.1 x the prompt's median
    embedding norm (the oracle's float64 `embed` point; LD102's threshold). The evidence names
    those tokens and positions, the relative norm of each row, every gradient point and weight
    with non-finite values (positions, or embedding-table rows) and the oracle finite there.
    A non-finite gradient that starts elsewhere is not this check's (left unexplained).

    ## Fix
    Keep the epsilon wherever the backward divides by the RMS: reuse the forward's saved
    `rstd = rsqrt(mean(x^2) + eps)` instead of recomputing it, and write the projection term as
    `x * rstd^3 * mean(x * g)`. Before fine-tuning with such tokens, initialise their rows
    (the mean of the trained rows) and check them with `llmdiff audit` (LD102).

    ## References
    Unsloth's note on Llama 3 base's untrained reserved tokens and NaN gradients;
    "Fishing for Magikarp: Automatically Detecting Under-trained Tokens" (arXiv:2405.05417);
    transformers `LlamaRMSNorm` (`torch.rsqrt(variance + self.variance_epsilon)`).
    """

    code = "LD607"
    name = "non-finite-gradient-at-untrained-rows"
    families = ALL_FAMILIES

    def judge(self, ev):
        import numpy as np

        from llmdiff import grad as names
        from llmdiff.sketch import Sketch

        def values(a):
            return a.data if isinstance(a, Sketch) else np.asarray(a)

        embed = ev.truth.get("embed")
        positions = ev.positions()
        if embed is None or embed.ndim < 2 or embed.shape[1] != len(positions):
            return []
        if isinstance(embed, Sketch):  # --capture sketch: each position's exact |x|^2 is its last value
            norms = np.sqrt(embed.data.reshape(embed.shape[1], -1)[:, -1])
        else:
            norms = np.linalg.norm(np.asarray(embed, np.float64).reshape(embed.shape[1], -1), axis=-1)
        median = float(np.median(norms))
        if not median > 0:
            return []
        relative = norms / median
        small = relative < RELATIVE_NORM

        points, weights = {}, {}
        for row in ev.run["points"]:
            name = row["name"]
            if not name.startswith(names.POINT) or name not in ev.cand or name not in ev.oracle:
                continue
            # A sketch's row (a position, a weight's row) is not finite where a value of it is not
            c, o = values(ev.cand[name]), values(ev.oracle[name])
            t = values(ev.truth.get(name, o))
            if c.shape != o.shape or o.shape != t.shape:
                continue
            bad = ~np.isfinite(c) & np.isfinite(o) & np.isfinite(t)
            if not bad.any():
                continue
            if names.is_weight(name):
                weights[name] = bad
            elif c.ndim >= 2 and c.shape[1] == len(positions):
                points[name] = np.flatnonzero(bad.reshape(bad.shape[0], bad.shape[1], -1).any(axis=(0, 2)))
        if not points and not weights:
            return []
        table = weights.get(names.WEIGHT + "embed")
        table_rows = ([int(i) for i in np.flatnonzero(table.reshape(table.shape[0], -1).any(axis=1))]
                      if table is not None else [])
        small_ids = {positions[k][2] for k in np.flatnonzero(small)}
        if points:
            where = next(iter(points))
            origin = points[where]
            if not all(small[k] for k in origin):
                return []
        else:   # only weight gradients: the table's non-finite rows must be small rows of the prompts
            where = next(iter(weights))
            if not table_rows or not set(table_rows) <= small_ids:
                return []
            origin = np.asarray([k for k in np.flatnonzero(small) if positions[k][2] in table_rows])
        rows = [{"token": positions[k][2], "prompt": positions[k][0], "position": positions[k][1],
                 "relative_norm": float(relative[k])} for k in origin[:SHOWN]]
        shown = ", ".join(f"token {r['token']} (prompt {r['prompt']} position {r['position']}, row norm"
                          f" {r['relative_norm']:.3g} x the median)" for r in rows[:4])
        counts = {n: int(m.sum()) for n, m in weights.items()}
        return [self.finding(
            ev, where,
            f"{where} is NaN or infinite at {len(origin)} position(s) where the oracle's is finite, all reading"
            f" (near-)zero embedding rows: {shown}{' ...' if len(origin) > 4 else ''}; {len(points)} gradient"
            f" point(s) and {len(weights)} weight gradient(s) are not finite"
            + (f" (embedding-table rows {table_rows[:SHOWN]})" if table_rows else ""),
            {"point": where, "rows": rows, "threshold": RELATIVE_NORM, "median_embed_norm": median,
             "small_rows_in_prompts": sorted(small_ids)[:SHOWN],
             "non_finite_points": {n: [list(positions[k][:2]) for k in ks[:SHOWN]] for n, ks in points.items()},
             "non_finite_weights": counts, "non_finite_embedding_rows": table_rows[:SHOWN],
             "oracle_finite": True, "backward_only": True},
            confirmed=True)]
