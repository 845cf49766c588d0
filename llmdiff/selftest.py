"""`llmdiff selftest`: does every dynamic check name its own bug, and only its own?

For each dtype, candidates are the oracle itself with bugs switched on: each dynamic check's
bug alone, the clean oracle, three bugs at once, on models with two kinds of layer a bug on global
layers only and two bugs each on its own kind of layer, and a bug no check knows (the attention
output scaled by 1.01). Each is compared with the clean oracle and diagnosed exactly as `compare`
diagnoses an implementation. The confusion matrix must be diagonal: each mutant named by its
own check and no other, nothing for the clean model, exactly the three for the triple, and
"unexplained" at the right point for the unknown bug.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from llmdiff import diagnose, diff, inputs, registry, weights
from llmdiff.check import UNSCOPED_KNOBS
from llmdiff.errors import LLMDiffError
from llmdiff.job import Job, WeightsSource
from llmdiff.spec import capture_points, get_spec

# A bug no check knows: the attention output scaled. 1% is far above float32 noise; bfloat16
# rounds each op to 0.4%, so there it takes 10% to stand out of the noise.
UNKNOWN_BUG = {"float32": {"attn_out_scale": 1.01}, "bfloat16": {"attn_out_scale": 1.1},
               # Under autocast the attention output is a matrix product's, in the low dtype.
               "autocast-bfloat16": {"attn_out_scale": 1.1}, "autocast-float16": {"attn_out_scale": 1.01}}
UNKNOWN_BUG_POINT = "L0.attn_out"
SELFTEST_LENGTHS = (160,)


def selftest_lengths(spec) -> tuple[int, ...]:
    """A long prompt: RoPE precision bugs grow with position. With a base of 10^6 (Qwen) most of
    a tiny head's frequencies turn slowly, so the prompt goes three times as far for them to act
    well above bfloat16's noise (measured: a bfloat16-angle mutant moves q by 2.2% at 160 tokens,
    5 times the floor, under the threshold of 8)."""
    return SELFTEST_LENGTHS if min(spec.rope_base, spec.rope_base_local) < 1e6 else (3 * SELFTEST_LENGTHS[0],)


def _first_acting_variant(lab, check, dtype, clean):
    """The first form of the check's bug that changes this model's output (GQA-only and
    per-model bugs have variants that are no-ops elsewhere)."""
    variants = check.variants()
    for policy, caps in zip(variants, lab.captures(dtype, variants)):
        if caps is not None and any(not np.array_equal(caps[k], clean[k]) for k in clean):
            return policy
    return variants[0]


def _scoped(policy: dict, scope: str) -> dict | None:
    """`policy` acting on layers of kind `scope` only; None when a knob cannot be scoped."""
    if any(k in UNSCOPED_KNOBS or "@" in k for k in policy):
        return None
    return {f"{k}@{scope}": v for k, v in policy.items()}


def _scoped_mutants(lab, acting, policies, dtype, clean, spec):
    """On a model with two kinds of layer (Gemma 2/3): a bug on global layers only, and two bugs
    each on its own kind (one on the local layers, another on the global ones). Each bug is the
    first (by code) whose scoped form changes this model's output."""
    if set(spec.layer_types) != {"local", "global"}:
        return []
    forms = {}
    for scope in ("global", "local"):
        tries = [(c, _scoped(policies[c.code], scope)) for c in acting]
        tries = [(c, p) for c, p in tries if p is not None]
        caps = lab.captures(dtype, [p for _, p in tries])
        forms[scope] = [(c, p) for (c, p), cap in zip(tries, caps)
                        if cap is not None and any(not np.array_equal(cap[k], clean[k]) for k in clean)]
    out = []
    if forms["global"]:
        c, p = forms["global"][0]
        out.append((f"{c.code}@global", p, [c.code], None))
    pair = next(((a, b) for a in forms["local"] for b in forms["global"] if a[0] is not b[0]
                 and not set(k.partition("@")[0] for k in a[1]) & set(k.partition("@")[0] for k in b[1])), None)
    if pair is not None:
        (a, pa), (b, pb) = pair
        out.append((f"{a.code}@local+{b.code}@global", {**pa, **pb}, [a.code, b.code], None))
    return out


def _three_that_act_together(lab, acting, policies, dtype) -> list:
    """Three bugs, by code, each of which still changes the output on top of the ones before it
    (a q/k norm switched off leaves nothing for a q/k-norm-order bug to act on): a triple the
    diagnosis can name in full."""
    chosen, policy = [], {}
    base, = lab.captures(dtype, [policy])
    for c in acting:
        if len(chosen) == 3:
            break
        if set(policies[c.code]) & set(policy):
            continue
        trial = {**policy, **policies[c.code]}
        caps, = lab.captures(dtype, [trial])
        if caps is not None and base is not None and any(not np.array_equal(caps[k], base[k]) for k in base):
            chosen.append(c)
            policy, base = trial, caps
    return chosen if len(chosen) == 3 else []


def _mutants(lab, checks, dtype, clean, spec):
    acting = [c for c in checks if c.applies(spec, dtype)]   # autocast: where float32's or the low dtype's
    policies = {c.code: _first_acting_variant(lab, c, dtype, clean) for c in acting}
    out = [("clean", {}, [], None)]
    out += [(c.code, policies[c.code], [c.code], None) for c in acting]
    three = _three_that_act_together(lab, acting, policies, dtype)
    if three:
        policy = {k: v for c in three for k, v in policies[c.code].items()}
        out.append(("+".join(c.code for c in three), policy, [c.code for c in three], None))
    out += _scoped_mutants(lab, acting, policies, dtype, clean, spec)
    out.append(("unknown", UNKNOWN_BUG[dtype], [diagnose.UNEXPLAINED[0]], UNKNOWN_BUG_POINT))
    return out


def selftest(model: str = "gemma-7b", dtypes=("float32", "bfloat16"), seed: int = 0, progress=None,
             only=()) -> dict:
    """The confusion matrix of `model`'s tiny oracle mutants; `only` (mutant names) diagnoses
    just those rows (a row no mutant of a dtype has is an error: a typo would pass as diagonal)."""
    say = progress or (lambda m: None)
    spec = get_spec(model, tiny=True)
    checks = [c for c in registry.load_checks()[0] if c.knob and c.applies(spec)]
    codes = {c.code for c in checks}
    for name in only:   # a name no row can have fails before any oracle run, not minutes later
        parts = [p.partition("@")[0] for p in name.split("+")]
        if name not in ("clean", "unknown") and not set(parts) <= codes:
            raise LLMDiffError(f"selftest {spec.name} has no mutant {name!r}: rows are clean, unknown and"
                               f" the checks' codes ({', '.join(sorted(codes))}), alone, joined by + or"
                               f" scoped as CODE@local / CODE@global")
    work = Path(tempfile.mkdtemp(prefix="llmdiff-selftest-"))
    lab = None
    try:
        canonical = work / "canonical.safetensors"
        weights.save_canonical(canonical, weights.random_weights(spec, seed))
        # A long prompt: RoPE precision bugs grow with position.
        job = Job(spec=spec.to_dict(), tokens=inputs.synthetic_prompts(spec, seed, selftest_lengths(spec)),
                  weights=WeightsSource(canonical=str(canonical)))
        lab = diagnose.OracleLab(job, work)
        points = capture_points(spec)
        rows = []
        for dtype in dtypes:
            say(f"{dtype}: running every check's bug")
            clean, = lab.captures(dtype, [{}])
            mutants = _mutants(lab, checks, dtype, clean, spec)
            if only:
                unknown = set(only) - {m[0] for m in mutants}
                if unknown:
                    raise LLMDiffError(f"selftest {spec.name} {dtype} has no mutant {', '.join(sorted(unknown))}"
                                       f" (it has: {', '.join(m[0] for m in mutants)})")
                mutants = [m for m in mutants if m[0] in only]
            truth, = lab.captures("float64", [{}], constants_dtype=dtype)
            lab.captures(dtype, [m[1] for m in mutants])
            floors = diff.noise_floors(clean, truth, dtype)
            # Teacher-forced runs of the clean oracle on every mutant's block inputs, in one worker.
            lab.run_many([w for m in mutants for w in (
                diagnose.Variant.of(dtype, forced_from=lab.path(diagnose.Variant.of(dtype, m[1]))),
                diagnose.Variant.of("float64", constants_dtype=dtype,
                                    forced_from=lab.path(diagnose.Variant.of(dtype, m[1]))))])
            silent = set()   # bugs under the noise alone at this dtype: optional where they come together
            for name, policy, expected, expected_point in mutants:
                caps, = lab.captures(dtype, [policy])
                if caps is None:
                    rows.append({"dtype": dtype, "mutant": name, "policy": policy, "expected": sorted(expected),
                                 "found": [], "where": [], "ok": False, "first_divergence": None,
                                 "error": lab.errors.get(diagnose.Variant.of(dtype, policy).key)})
                    continue
                run = dict(diff.compare_captures(caps, clean, floors, dtype, points), dtype=dtype)
                path = lab.path(diagnose.Variant.of(dtype, policy))
                forced, _ = diagnose.teacher_forced(lab, caps, path, dtype, points)
                # A bug whose effect on this tiny model stays under the noise floor at this dtype,
                # free-running and op by op (a soft-cap the tiny logits never reach, in bfloat16),
                # cannot be named here: the matrix expects nothing and says so.
                acts = run["verdict"] == "divergence" or forced["verdict"] == "divergence"
                if not acts and name not in ("clean", "unknown"):
                    silent.update(expected)
                    expected = []
                before = lab.runs
                found = diagnose.explain(diagnose.Case(lab, spec, name, caps, path, floors, points), checks, run)
                diff.attach_forced(run, forced)
                codes = sorted(f.code for f in found)
                # A bug under the noise alone may stay so next to others (exact GELU under autocast):
                # it is not required, and named it is no false finding.
                ok = set(expected) - silent <= set(codes) <= set(expected) and len(codes) == len(set(codes)) and (
                    expected_point is None or any(f.where == expected_point for f in found))
                rows.append({"dtype": dtype, "mutant": name, "policy": policy, "expected": sorted(expected),
                             "found": codes, "where": [f.where for f in found], "ok": ok,
                             "first_divergence": run["first_divergence"], "acts": acts,
                             "oracle_runs": lab.runs - before})   # the diagnosis' own, not cached before
            lab.forget()   # no run of this dtype is read by the next one's
        return {"model": spec.name, "dtypes": list(dtypes), "checks": [c.code for c in checks], "rows": rows,
                "diagonal": all(r["ok"] for r in rows), "oracle_runs": lab.runs, "errors": lab.errors}
    finally:
        if lab is not None:
            lab.close()
        shutil.rmtree(work, ignore_errors=True)


def render(result: dict, console) -> None:
    from rich.table import Table

    codes = result["checks"] + [diagnose.UNEXPLAINED[0]]
    for dtype in result["dtypes"]:
        table = Table(title=f"selftest {result['model']} (tiny), {dtype}: mutant (rows) x finding (columns)",
                      title_justify="left")
        table.add_column("mutant")
        for c in codes:
            table.add_column(c, justify="center")
        table.add_column("ok")
        for r in (r for r in result["rows"] if r["dtype"] == dtype):
            cells = []
            for c in codes:
                hit, want = c in r["found"], c in r["expected"]
                cells.append("[green]X[/green]" if hit and want else "[red]X[/red]" if hit else
                             "[red]-[/red]" if want else "·")
            mutant = r["mutant"] if r.get("acts", True) else f"{r['mutant']} (under the noise here)"
            table.add_row(mutant, *cells, "[green]yes[/green]" if r["ok"] else "[red]no[/red]")
        console.print(table)
    for key, err in result["errors"].items():
        console.print(f"[red]oracle run failed[/red] {key}: {err}")
    verdict = "[green]diagonal[/green]" if result["diagonal"] else "[red]NOT diagonal[/red]"
    console.print(f"{verdict} ({result['oracle_runs']} oracle runs)")
