"""`llmdiff audit`: a clean tiny checkpoint audits clean; each mutation is named by exactly its
check; broken files, pickles and remote code are reported and never loaded or executed."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from audit_fixtures import write_example_tokenizer_files
from llmdiff import audit, audit_stream, safetensors_file, weights
from llmdiff.cli import main
from llmdiff.spec import get_spec

MODELS = ("gemma-7b", "gemma-2-9b", "gemma-2-27b", "gemma-3-4b")


@pytest.fixture(scope="module")
def clean_checkpoints(tmp_path_factory):
    """One clean tiny checkpoint per model: weights, config, tokenizer and generation files."""
    root = tmp_path_factory.mktemp("clean")
    out = {}
    for model in MODELS:
        spec = get_spec(model, tiny=True)
        path = root / model
        weights.write_hf_checkpoint(path, spec, weights.random_weights(spec, seed=1))
        write_example_tokenizer_files(path, spec)
        out[model] = path
    return out


@pytest.fixture
def checkpoint(clean_checkpoints, tmp_path):
    """A fresh copy of a clean checkpoint to mutate: checkpoint("gemma-7b")."""

    def copy(model="gemma-7b"):
        dst = tmp_path / f"ckpt-{model}"
        shutil.copytree(clean_checkpoints[model], dst)
        return dst

    return copy


def run_audit(*args):
    """`llmdiff audit ARGS... -q --json`: (exit code, stdout, stderr, report or None)."""
    report_path = None
    args = list(args)
    if args and not str(args[0]).startswith("-"):
        report_path = f"{args[0]}.report.json"
        args += ["--json", report_path]
    result = CliRunner().invoke(main, ["audit", *map(str, args), "-q"], catch_exceptions=False)
    report = json.loads(open(report_path).read()) if report_path and os.path.exists(report_path) else None
    return result.exit_code, result.stdout, result.stderr, report


def codes(report) -> set[str]:
    return {f["code"] for f in report["findings"]}


# --- mutations ------------------------------------------------------------------------------

def edit_json(path, name, **changes):
    data = json.loads((path / name).read_text())
    for key, value in changes.items():
        if value is DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    (path / name).write_text(json.dumps(data))


DELETE = object()


def edit_tensors(path, fn):
    """Rewrite model.safetensors with fn(tensors) applied (tensors: name -> writable array)."""
    f = path / "model.safetensors"
    tensors = {k: np.array(v) for k, v in safetensors_file.load(f).items()}
    fn(tensors)
    safetensors_file.save(f, tensors, {"format": "pt"})


L0 = "model.layers.0"
EMBED = "model.embed_tokens.weight"


def nan_in_weight(p):
    def fn(t):
        t[f"{L0}.mlp.up_proj.weight"][3, 5] = np.nan
        t[f"{L0}.mlp.up_proj.weight"][4, 0] = np.inf
    edit_tensors(p, fn)


def zero_projection(p):
    edit_tensors(p, lambda t: t[f"{L0}.self_attn.o_proj.weight"].__setitem__(..., 0))


def shrink_token_rows(p):
    def fn(t):
        t[EMBED][200:205] *= ml_dtypes.bfloat16(1e-3)
    edit_tensors(p, fn)


def untied_lm_head(p):
    def fn(t):
        t["lm_head.weight"] = (t[EMBED].astype(np.float32) * 1.5).astype(ml_dtypes.bfloat16)
    edit_tensors(p, fn)


def drop_k_proj(p):
    edit_tensors(p, lambda t: t.pop(f"{L0}.self_attn.k_proj.weight"))


def embed_rows_differ(p):
    edit_tensors(p, lambda t: t.__setitem__(EMBED, t[EMBED][:500]))


def token_beyond_table(p):
    tok = json.loads((p / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 600, "content": "<image>", "special": True})
    (p / "tokenizer.json").write_text(json.dumps(tok))


def one_tensor_float32(p):
    edit_tensors(p, lambda t: t.__setitem__("model.norm.weight", t["model.norm.weight"].astype(np.float32)))


def truncate(p):
    f = p / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 1000)


def corrupt_header(p):
    f = p / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:12] = b"XXXX"
    f.write_bytes(bytes(raw))


def index_names_missing_shard(p):
    header, _ = safetensors_file.read_header(p / "model.safetensors")
    weight_map = {name: "model.safetensors" for name in header}
    weight_map[EMBED] = "model-00002-of-00002.safetensors"
    (p / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def pickle_next_to_safetensors(p):
    (p / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "loaded"}))


def python_file(p):
    (p / "modeling_custom.py").write_text("raise SystemExit('never imported')\n")


def layer_types_swapped(p):
    cfg = json.loads((p / "config.json").read_text())
    cfg["layer_types"] = list(reversed(cfg["layer_types"]))
    (p / "config.json").write_text(json.dumps(cfg))


def tokenizer_pad_is_eos(p):
    edit_json(p, "tokenizer_config.json", pad_token="<eos>")
    edit_json(p, "special_tokens_map.json", pad_token="<eos>")


def config_pad_is_eos(p):
    edit_json(p, "config.json", pad_token_id=1)
    edit_json(p, "generation_config.json", pad_token_id=1)


# (test id, model, mutation, extra CLI args, the one code expected)
CASES = [
    ("nan-inf", "gemma-7b", nan_in_weight, (), "LD701"),
    ("zero-o-proj", "gemma-7b", zero_projection, (), "LD702"),
    ("undertrained-rows", "gemma-7b", shrink_token_rows, (), "LD102"),
    ("tied-but-lm-head-differs", "gemma-7b", untied_lm_head, (), "LD103"),
    ("untied-without-lm-head", "gemma-7b", lambda p: edit_json(p, "config.json", tie_word_embeddings=False),
     (), "LD103"),
    ("vocab-size-vs-spec-and-rows", "gemma-7b", lambda p: edit_json(p, "config.json", vocab_size=640), (), "LD104"),
    ("embed-rows-vs-config", "gemma-7b", embed_rows_differ, (), "LD104"),
    ("token-id-past-table", "gemma-7b", token_beyond_table, (), "LD104"),
    ("missing-tensor", "gemma-7b", drop_k_proj, (), "LD703"),
    ("mixed-dtypes", "gemma-7b", one_tensor_float32, (), "LD704"),
    ("config-dtype", "gemma-7b", lambda p: edit_json(p, "config.json", torch_dtype="float32"), (), "LD704"),
    ("gemma1-exact-gelu", "gemma-7b",
     lambda p: edit_json(p, "config.json", hidden_act="gelu", hidden_activation=DELETE), (), "LD705"),
    ("gemma2-only-hidden-act", "gemma-2-9b",
     lambda p: edit_json(p, "config.json", hidden_activation=DELETE), (), "LD705"),
    ("gemma3-exact-gelu", "gemma-3-4b",
     lambda p: edit_json(p, "config.json", hidden_activation="gelu"), (), "LD705"),
    ("norm-eps", "gemma-7b", lambda p: edit_json(p, "config.json", rms_norm_eps=1e-5), (), "LD706"),
    ("rope-base", "gemma-7b", lambda p: edit_json(p, "config.json", rope_theta=500000.0), (), "LD707"),
    ("gemma3-rope-scaling-missing", "gemma-3-4b",
     lambda p: edit_json(p, "config.json", rope_scaling=None), (), "LD707"),
    ("gemma3-local-base-absent", "gemma-3-4b",
     lambda p: edit_json(p, "config.json", rope_local_base_freq=1000000.0), (), "LD707"),
    ("sliding-window-size", "gemma-2-9b",
     lambda p: edit_json(p, "config.json", sliding_window=DELETE), (), "LD708"),
    ("sliding-window-pattern", "gemma-2-9b", layer_types_swapped, (), "LD708"),
    ("softcap-missing", "gemma-2-9b",
     lambda p: edit_json(p, "config.json", final_logit_softcapping=None), (), "LD709"),
    ("gemma3-softcap-copied", "gemma-3-4b",
     lambda p: edit_json(p, "config.json", attn_logit_softcapping=50.0), (), "LD709"),
    ("query-scale", "gemma-2-27b", lambda p: edit_json(p, "config.json", query_pre_attn_scalar=DELETE),
     (), "LD710"),
    ("wrong-model", "gemma-7b", lambda p: None, ("--model", "gemma-2b"), "LD711"),
    ("truncated", "gemma-7b", truncate, (), "LD712"),
    ("corrupt-header", "gemma-7b", corrupt_header, (), "LD712"),
    ("index-missing-shard", "gemma-7b", index_names_missing_shard, (), "LD712"),
    ("pickle-next-to-safetensors", "gemma-7b", pickle_next_to_safetensors, (), "LD713"),
    ("auto-map", "gemma-7b",
     lambda p: edit_json(p, "config.json", auto_map={"AutoModelForCausalLM": "modeling_x.X"}), (), "LD714"),
    ("python-file", "gemma-7b", python_file, (), "LD714"),
    ("config-pad-is-eos", "gemma-7b", config_pad_is_eos, (), "LD050"),
    ("tokenizer-pad-is-eos", "gemma-7b", tokenizer_pad_is_eos, (), "LD050"),
    ("end-of-turn-not-eos", "gemma-7b", lambda p: edit_json(p, "generation_config.json", eos_token_id=[1]),
     (), "LD051"),
    ("special-token-misspelt", "gemma-7b",
     lambda p: edit_json(p, "tokenizer_config.json", additional_special_tokens=["<start_of_turn>", "<end-of-turn>"]),
     (), "LD052"),
    ("bos-id", "gemma-7b", lambda p: edit_json(p, "config.json", bos_token_id=5), (), "LD053"),
]


@pytest.mark.parametrize("model", MODELS)
def test_clean_checkpoint_audits_clean(clean_checkpoints, model, tmp_path):
    code, out, err, report = run_audit(clean_checkpoints[model], "--out", tmp_path / "out")
    assert (code, report["findings"], err) == (0, [], "")
    assert report["model"] == model and report["spec"]["tiny"] is True
    assert report["exit_code"] == 0 and report["tensors"]["count"] > 0
    assert report["stream"]["bytes"] == sum(
        info["data_offsets"][1] - info["data_offsets"][0]
        for info in safetensors_file.read_header(clean_checkpoints[model] / "model.safetensors")[0].values())
    assert len(report["checks"]["selected"]) >= 20
    assert json.loads((tmp_path / "out" / "audit.json").read_text())["exit_code"] == 0
    assert "Findings: 0" in (tmp_path / "out" / "audit.md").read_text()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_mutation_is_named_by_its_check_only(checkpoint, case):
    _, model, mutate, args, expected = case
    path = checkpoint(model)
    mutate(path)
    code, out, err, report = run_audit(path, *args)
    assert code == 1, (out, err)
    assert codes(report) == {expected}, report["findings"]
    finding = report["findings"][0]
    assert finding["implementation"] == "checkpoint" and finding["dtype"] is None
    assert finding["fix"] and finding["message"] and finding["where"]
    assert set(finding) >= {"code", "name", "implementation", "dtype", "where", "message", "evidence",
                            "confirmed", "fix"}
    assert expected in out  # the -q summary names it


def test_every_audit_check_has_a_mutation_case():
    checks, _ = audit.audit_checks()
    assert {c.code for c in checks} == {c[4] for c in CASES}


def test_evidence_points_at_the_bad_values(checkpoint):
    path = checkpoint()
    nan_in_weight(path)
    shrink_token_rows(path)
    report = audit.audit(path).report
    nan = next(f for f in report["findings"] if f["code"] == "LD701")
    assert nan["where"] == f"{L0}.mlp.up_proj.weight"
    assert (nan["evidence"]["nan"], nan["evidence"]["inf"], nan["evidence"]["first_index"]) == (1, 1, [3, 5])
    rows = next(f for f in report["findings"] if f["code"] == "LD102")
    assert rows["evidence"]["ids"] == [200, 201, 202, 203, 204]
    assert rows["evidence"]["tokens"] == ["tok200", "tok201", "tok202", "tok203", "tok204"]


def test_lm_head_bitwise_equal_to_tied_embeddings_is_clean(checkpoint):
    path = checkpoint()
    edit_tensors(path, lambda t: t.__setitem__("lm_head.weight", t[EMBED].copy()))
    result = audit.audit(path)
    assert result.exit_code == 0, result.summary()
    tables = [r for r in result.context.tensors.values() if r.is_token_table]
    assert len(tables) == 2 and tables[0].stats.digest == tables[1].stats.digest is not None


def test_streaming_in_small_blocks_gives_the_same_statistics(checkpoint):
    """Blocks of a few rows (a tensor split across many reads) give exactly the whole-array numbers."""
    path = checkpoint()
    nan_in_weight(path)
    whole = audit.load_context(path)
    audit_stream.stream_stats(whole, [], block_bytes=1 << 30)
    small = audit.load_context(path)
    seen = []
    audit_stream.stream_stats(small, [], block_bytes=1000, progress=lambda done, total: seen.append((done, total)))
    arrays = safetensors_file.load(path / "model.safetensors")
    for name, rec in small.tensors.items():
        a, b = rec.stats, whole.tensors[name].stats
        x = np.asarray(arrays[name], np.float32)
        assert (a.nan, a.inf, a.first_nonfinite) == (b.nan, b.inf, b.first_nonfinite), name
        assert a.nan == int(np.isnan(x).sum()) and a.inf == int(np.isinf(x).sum())
        assert a.absmax == float(np.abs(x[np.isfinite(x)]).max()), name
        if rec.is_token_table:
            np.testing.assert_allclose(a.row_norms, np.linalg.norm(x, axis=1), rtol=1e-5)
            assert a.digest == b.digest
    assert seen[-1][0] == seen[-1][1] == sum(r.nbytes for r in small.tensors.values())
    assert len(seen) > len(small.tensors)  # really read in many blocks


MARKER_PAYLOAD = "import pathlib; pathlib.Path({marker!r}).write_text('pwned')"


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (MARKER_PAYLOAD.format(marker=str(self.marker)),))


def test_malicious_pickle_is_reported_and_never_unpickled(tmp_path, checkpoint):
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps({"model.embed_tokens.weight": _Payload(marker)})
    # The payload is live: unpickling it (in another process) runs it.
    probe = tmp_path / "probe.bin"
    probe.write_bytes(payload)
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.loads(open({str(probe)!r}, 'rb').read())"],
                   check=True)
    assert marker.read_text() == "pwned"
    marker.unlink()
    # A pickle-only checkpoint: reported, never loaded.
    path = tmp_path / "pickle-only"
    path.mkdir()
    shutil.copy(checkpoint() / "config.json", path / "config.json")
    (path / "pytorch_model.bin").write_bytes(payload)
    (path / "training_args.pt").write_bytes(payload)
    code, out, err, report = run_audit(path)
    assert code == 1 and codes(report) == {"LD713"}
    finding = report["findings"][0]
    assert "only pickle weights" in finding["message"] and "never unpickled" in finding["message"]
    assert sorted(finding["evidence"]["files"]) == ["pytorch_model.bin", "training_args.pt"]
    assert not marker.exists()


def test_remote_code_is_reported_and_never_executed(checkpoint, tmp_path):
    path = checkpoint()
    marker = tmp_path / "imported"
    (path / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    edit_json(path, "config.json", auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"})
    code, _, _, report = run_audit(path)
    assert code == 1 and codes(report) == {"LD714"}
    assert {f["where"] for f in report["findings"]} == {"config.json:auto_map", "modeling_evil.py"}
    assert not marker.exists() and "modeling_evil" not in sys.modules


def test_truncated_file_message_says_what_and_where(checkpoint):
    path = checkpoint()
    truncate(path)
    report = audit.audit(path).report
    (finding,) = report["findings"]
    assert finding["where"] == "model.safetensors"
    assert "truncated" in finding["message"] and "re-download" in finding["message"]
    assert finding["evidence"]["unreadable"] is True


def test_select_ignore_and_user_errors(checkpoint, tmp_path):
    path = checkpoint()
    nan_in_weight(path)
    edit_json(path, "config.json", rms_norm_eps=1e-5)
    assert codes(run_audit(path)[3]) == {"LD701", "LD706"}
    assert codes(run_audit(path, "--select", "LD701")[3]) == {"LD701"}
    code, _, _, report = run_audit(path, "--ignore", "LD7")
    assert code == 0 and report["findings"] == [] and not any(c.startswith("LD7") for c in report["checks"]["selected"])
    code, out, err, _ = run_audit(path, "--select", "LD301")
    assert code == 2 and err.startswith("llmdiff: error: no check matches 'LD301'") and err.count("\n") == 1
    code, _, err, _ = run_audit(tmp_path / "nowhere")
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    (path / "config.json").write_text("{not json")
    code, _, err, report = run_audit(path)
    # The error is said; the report an earlier run wrote there is not replaced by it.
    assert code == 2 and "config.json: not valid JSON" in err and "left as it was" in err
    assert report["exit_code"] == 0
    code, _, err, _ = run_audit(checkpoint("gemma-2-9b"), "--model", "gemma-9")
    assert code == 2 and "unknown model 'gemma-9'" in err


def test_python_api_and_registry_integration(checkpoint):
    from llmdiff import diagnose, registry

    result = audit.audit(checkpoint())
    assert result and result.exit_code == 0 and "clean" in result.summary()
    checks, broken = registry.load_checks()
    assert broken == []
    kinds = {c.code: c.kind for c in checks}
    assert kinds["LD701"] == "audit" and kinds["LD301"] == "dynamic"
    # compare's static pass never runs checkpoint checks on an implementation's context
    found = diagnose.static_findings(checks, get_spec("gemma-7b", tiny=True), "hf", {}, None, None)
    assert not any(f.code.startswith(("LD05", "LD7")) for f in found)


def test_unknown_family_still_gets_file_and_weight_checks(checkpoint):
    path = checkpoint()
    edit_json(path, "config.json", model_type="olmo", architectures=["OlmoForCausalLM"])
    zero_projection(path)
    report = audit.audit(path).report
    assert report["model"] is None and report["family"] is None
    assert codes(report) == {"LD702"}


def test_readme_lists_every_audit_check_and_its_command_runs(clean_checkpoints, tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## `llmdiff audit`"):readme.index("## Layout")]
    listed = dict(re.findall(r"^\| (LD\d{3}) \| ([a-z0-9-]+) \|", section, re.M))
    checks, _ = audit.audit_checks()
    assert listed == {c.code: c.name for c in checks}
    # the usage line, with the README's options, on a clean tiny gemma-7b
    result = CliRunner().invoke(main, ["audit", str(clean_checkpoints["gemma-7b"]), "--model", "gemma-7b",
                                       "--json", str(tmp_path / "report.json"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "clean" in result.stdout and "gemma-7b, tiny" in result.stdout
