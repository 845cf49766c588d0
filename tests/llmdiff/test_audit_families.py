"""`llmdiff audit` on Llama 3.x, Qwen 2.5 / 3, Mistral and Phi-3 checkpoints written by transformers'
own `save_pretrained`: each tiny one audits clean and is recognised as its model; each config
defect a family rule knows about is named by exactly its check."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from llmdiff import hf_format, safetensors_file, weights
from llmdiff.cli import main
from llmdiff.spec import LLAMA_LIKE_FAMILIES, get_spec

# One model per feature the audit must know: untied and tied heads, llama3 RoPE, qkv biases,
# q/k norms, a sliding window on every layer, and none where the family default has one;
# fused projections, LongRoPE (two models of one shape, told apart by their factors).
MODELS = ("llama-3.1-8b", "llama-3.2-1b", "qwen2.5-7b", "qwen2.5-0.5b", "qwen3-8b", "mistral-7b-v0.1",
          "mistral-7b-v0.3", "phi-3-mini-4k-instruct", "phi-3-mini-128k-instruct", "phi-3.5-mini-instruct")
# Each family's special tokens as their tokenizers spell them (tiny ids: pad 0, eos 1, bos 2,
# end of turn 3), and a chat template that ends turns with the end-of-turn token.
TOKENS = {
    "llama": {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": None, "eot": "<|eot_id|>",
              "turn": "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"},
    "qwen2": {"bos": None, "eos": "<|endoftext|>", "pad": "<|pad|>", "eot": "<|im_end|>",
              "turn": "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"},
    "mistral": {"bos": "<s>", "eos": "</s>", "pad": None, "eot": None, "turn": "[INST] {{ m['content'] }} [/INST]"},
    "phi3": {"bos": "<s>", "eos": "<|endoftext|>", "pad": "<unk>", "eot": "<|end|>",
             "turn": "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"},
}
TOKENS["qwen3"] = TOKENS["qwen2"]


def save_tiny_checkpoint(path, spec, seed: int = 0) -> None:
    """A tiny model of `spec` as transformers builds and saves it: the class from the config
    llmdiff writes, small seeded weights (norm scales around 1), bfloat16, save_pretrained."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    config = transformers.AutoConfig.for_model(**weights.hf_config(spec))
    model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * 0.02
            p.copy_(noise + 1 if name.endswith("norm.weight") else noise)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    write_tokenizer_files(path, spec)


def write_tokenizer_files(path, spec) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json
    with the family's special tokens at the tiny ids."""
    names = TOKENS[spec.family]
    ids = {"pad": spec.pad_id, "eos": spec.eos_id, "bos": spec.bos_id, "eot": 3}
    special = {names[k]: i for k, i in ids.items() if names[k] is not None and i is not None}
    by_id = {i: t for t, i in special.items()}
    vocab = {by_id.get(i, f"tok{i}"): i for i in range(spec.text_vocab_size)}
    tokenizer = {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []},
                 "added_tokens": [{"id": i, "content": t, "special": True} for t, i in special.items()]}
    tokens = {f"{k}_token": names[k] for k in ("bos", "eos", "pad") if names[k] is not None and ids[k] is not None}
    chat = "{% for m in messages %}" + names["turn"] + "{% endfor %}"
    eos = [spec.eos_id] + ([ids["eot"]] if names["eot"] else [])
    generation = {"bos_token_id": spec.bos_id, "eos_token_id": eos, "pad_token_id": spec.pad_id}
    for name, data in (("tokenizer.json", tokenizer), ("tokenizer_config.json", {**tokens, "chat_template": chat}),
                       ("special_tokens_map.json", tokens), ("generation_config.json", generation)):
        (path / name).write_text(json.dumps(data, indent=1) + "\n")


@pytest.fixture(scope="module")
def clean_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {}
    for model in MODELS:
        save_tiny_checkpoint(root / model, get_spec(model, tiny=True))
        out[model] = root / model
    return out


@pytest.fixture
def checkpoint(clean_checkpoints, tmp_path):
    def copy(model):
        dst = tmp_path / model
        shutil.copytree(clean_checkpoints[model], dst)
        return dst

    return copy


def run_audit(path, *args):
    """`llmdiff audit PATH ARGS... -q --json`: (exit code, stdout, report)."""
    report_path = f"{path}.report.json"
    result = CliRunner().invoke(main, ["audit", str(path), *args, "-q", "--json", report_path],
                                catch_exceptions=False)
    return result.exit_code, result.stdout, json.loads(open(report_path).read())


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


DELETE = object()


def drop_tensors(path, suffix):
    tensors = {k: np.array(v) for k, v in safetensors_file.load(path / "model.safetensors").items()
               if not k.endswith(suffix)}
    safetensors_file.save(path / "model.safetensors", tensors, {"format": "pt"})


def test_the_models_cover_every_new_family():
    assert {get_spec(m).family for m in MODELS} == set(LLAMA_LIKE_FAMILIES)


@pytest.mark.parametrize("model", MODELS)
def test_save_pretrained_checkpoint_audits_clean_as_its_model(clean_checkpoints, model):
    path = clean_checkpoints[model]
    code, out, report = run_audit(path)
    assert (code, report["findings"]) == (0, []), out
    spec = get_spec(model, tiny=True)
    assert (report["model"], report["family"], report["spec"]["tiny"]) == (model, spec.family, True)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == hf_format.MODEL_TYPES[spec.family][0]
    # what transformers wrote: its own config format, the tensors the family has
    names = set(safetensors_file.read_header(path / "model.safetensors")[0])
    assert ("lm_head.weight" in names) != spec.tie_embeddings
    assert any(n.endswith("q_proj.bias") for n in names) == spec.qkv_bias
    assert any(n.endswith("q_norm.weight") for n in names) == spec.qk_norm
    # every check of the audit ran: the family-specific ones only where they apply
    assert len(report["checks"]["selected"]) >= 20


@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen3-8b", "mistral-7b-v0.3"])
def test_model_option_accepts_the_new_models(clean_checkpoints, model):
    code, out, report = run_audit(clean_checkpoints[model], "--model", model)
    assert (code, report["model"], report["spec"]["tiny"]) == (0, model, True), out


def test_transformers_4_rope_fields_with_the_old_type_name_audit_clean(checkpoint):
    """`rope_theta` + `rope_scaling` (transformers 4), the kind under its old name `type`: what
    transformers reads as llama3 scaling is llama3 scaling."""
    path = checkpoint("llama-3.1-8b")
    params = json.loads((path / "config.json").read_text())["rope_parameters"]
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type")}
    edit_config(path, rope_parameters=DELETE, rope_theta=params["rope_theta"], rope_scaling={**scaling, "type": "llama3"})
    code, out, report = run_audit(path)
    assert (code, report["model"]) == (0, "llama-3.1-8b"), out


def _rope(path, **changes):
    params = json.loads((path / "config.json").read_text())["rope_parameters"]
    params.update(changes)
    edit_config(path, rope_parameters={k: v for k, v in params.items() if v is not DELETE})


def _transformers_4_rope(path, rope_scaling, rope_theta=DELETE):
    edit_config(path, rope_parameters=DELETE, rope_theta=rope_theta, rope_scaling=rope_scaling)


# (test id, model, mutation, extra CLI args, the one code expected, words the message has)
CASES = [
    ("llama-gelu", "llama-3.1-8b", lambda p: edit_config(p, hidden_act="gelu_pytorch_tanh"), (), "LD705",
     "uses SiLU"),
    ("qwen-hidden-activation-disagrees", "qwen2.5-7b", lambda p: edit_config(p, hidden_activation="gelu"), (),
     "LD705", "reads only hidden_act"),
    ("llama-eps-absent", "llama-3.1-8b", lambda p: edit_config(p, rms_norm_eps=DELETE), (), "LD706",
     "transformers' default 1e-06"),
    ("mistral-eps", "mistral-7b-v0.1", lambda p: edit_config(p, rms_norm_eps=1e-6), (), "LD706", "uses 1e-05"),
    ("llama3-scaling-missing", "llama-3.1-8b", lambda p: _rope(p, rope_type="default", factor=DELETE,
                                                               low_freq_factor=DELETE, high_freq_factor=DELETE,
                                                               original_max_position_embeddings=DELETE),
     (), "LD707", "uses base 500000, llama3 scaling x8"),
    ("llama3-scaling-linear", "llama-3.1-8b", lambda p: _transformers_4_rope(
        p, {"rope_type": "linear", "factor": 8.0}, 500000.0), (), "LD707", "linear scaling x8;"),
    ("llama3-scaling-absent-v4", "llama-3.2-1b", lambda p: _transformers_4_rope(p, None, 500000.0), (), "LD707",
     "default scaling x1"),
    ("llama3-original-context", "llama-3.1-8b", lambda p: _rope(p, original_max_position_embeddings=8192), (),
     "LD707", "original_max_position_embeddings 8192"),
    ("llama3-factor", "llama-3.2-1b", lambda p: _rope(p, factor=8.0), (), "LD707", "llama3 scaling x32"),
    ("rope-type-and-type-disagree", "llama-3.1-8b", lambda p: _rope(p, type="linear"), (), "LD707",
     "tools that read type run linear"),
    ("qwen3-rope-theta-absent", "qwen3-8b", lambda p: _transformers_4_rope(p, None), (), "LD707",
     "RoPE base 10000.0"),
    ("mistral-v0.3-window-absent", "mistral-7b-v0.3", lambda p: edit_config(p, sliding_window=DELETE), (), "LD708",
     "sliding_window is absent (transformers' default 4096) but mistral-7b-v0.3 slides on no layer"),
    # tiny v0.1 and v0.3 differ only in the window and the RoPE base: name the model
    ("mistral-v0.1-window-null", "mistral-7b-v0.1", lambda p: edit_config(p, sliding_window=None),
     ("--model", "mistral-7b-v0.1"), "LD708", "sliding_window is None but mistral-7b-v0.1 uses 32"),
    ("qwen-sliding-window-on", "qwen2.5-7b", lambda p: edit_config(p, use_sliding_window=True, sliding_window=32,
                                                                   max_window_layers=0, layer_types=DELETE),
     (), "LD708", "use_sliding_window is True (sliding_window 32)"),
    ("llama3.2-tie-absent", "llama-3.2-1b", lambda p: edit_config(p, tie_word_embeddings=DELETE), (), "LD103",
     "absent: the default"),
    ("qwen2-bias-dropped", "qwen2.5-7b", lambda p: drop_tensors(p, "self_attn.k_proj.bias"), (), "LD703",
     "tensors missing"),
    ("qwen3-qk-norm-dropped", "qwen3-8b", lambda p: drop_tensors(p, "self_attn.q_norm.weight"), (), "LD703",
     "tensors missing"),
    ("qwen2-head-dim-mismatch", "qwen2.5-7b", lambda p: edit_config(p, head_dim=16), (), "LD703",
     "shapes config.json does not imply"),
    ("wrong-llama", "llama-3.1-8b", lambda p: None, ("--model", "llama-3.1-70b"), "LD711",
     "sizes differ from llama-3.1-70b"),
    # Phi-3: the window (absent is none), LongRoPE dropped or with another original context (the
    # tiny 128k and 3.5 differ only in their factors: the model named)
    ("phi3-4k-window-absent", "phi-3-mini-4k-instruct", lambda p: edit_config(p, sliding_window=DELETE), (), "LD708",
     "sliding_window is absent (transformers' default None) but phi-3-mini-4k-instruct uses 32"),
    ("phi3-longrope-dropped", "phi-3-mini-128k-instruct", lambda p: _transformers_4_rope(p, None, 10000.0),
     ("--model", "phi-3-mini-128k-instruct"), "LD707", "uses base 10000, longrope scaling x32"),
    ("phi3-original-context", "phi-3-mini-128k-instruct", lambda p: edit_config(p, original_max_position_embeddings=32),
     ("--model", "phi-3-mini-128k-instruct"), "LD707", "original_max_position_embeddings 32"),
    ("phi3-factors-of-another-model", "phi-3.5-mini-instruct", lambda p: None,
     ("--model", "phi-3-mini-128k-instruct"), "LD707", "short_factor [1 .. 2.84]"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_config_defect_is_named_by_its_check_only(checkpoint, case):
    _, model, mutate, args, expected, words = case
    path = checkpoint(model)
    mutate(path)
    code, out, report = run_audit(path, *args)
    assert code == 1, out
    assert {f["code"] for f in report["findings"]} == {expected}, report["findings"]
    assert any(words in f["message"] for f in report["findings"]), report["findings"]
    assert report["family"] == get_spec(model).family


@pytest.mark.parametrize("kind", ["su", "longrope"])
def test_phi3_transformers_4_longrope_fields_audit_clean(checkpoint, kind):
    """Phi-3 128k's own config.json form: `rope_theta`, `rope_scaling` with `type` "longrope" (its
    first release: "su"), the original context at the top level."""
    path = checkpoint("phi-3-mini-128k-instruct")
    params = json.loads((path / "config.json").read_text())["rope_parameters"]
    _transformers_4_rope(path, {"type": kind, "short_factor": params["short_factor"],
                                "long_factor": params["long_factor"]}, params["rope_theta"])
    code, out, report = run_audit(path)
    assert (code, report["model"]) == (0, "phi-3-mini-128k-instruct"), out


def test_qwen_window_on_but_past_the_last_layer_still_is_named(checkpoint):
    """`use_sliding_window` with the default max_window_layers (28) slides no layer of the
    tiny model: the window is still one the model does not have, the pattern is right."""
    path = checkpoint("qwen3-8b")
    edit_config(path, use_sliding_window=True, sliding_window=4096, layer_types=DELETE)
    code, out, report = run_audit(path)
    assert [(f["code"], f["where"]) for f in report["findings"]] == [("LD708", "config.json:use_sliding_window")]


# The fields the new families' rules read: a wrong JSON type is one error line (exit 2), never
# a traceback or a wrong finding.
WRONG_FIELDS = [
    ("qwen2.5-7b", {"use_sliding_window": "false"}, "use_sliding_window must be true or false, found a string"),
    ("qwen3-8b", {"max_window_layers": -1}, "max_window_layers must be a non-negative integer, found -1"),
    ("llama-3.1-8b", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": "1"}},
     "rope_parameters must be an object whose low_freq_factor is a number, found a string"),
    ("llama-3.1-8b", {"rope_scaling": {"type": "llama3", "factor": 8.0, "original_max_position_embeddings": [8192]}},
     "rope_scaling must be an object whose original_max_position_embeddings is a number, found an array"),
    ("phi-3-mini-128k-instruct",
     {"rope_parameters": {"rope_type": "longrope", "short_factor": "1.0", "long_factor": [1.0]}},
     "rope_parameters must be an object whose short_factor is an array of numbers, found a string"),
    ("phi-3-mini-128k-instruct", {"original_max_position_embeddings": "64"},
     "original_max_position_embeddings must be an integer above 1, found a string"),
]


@pytest.mark.parametrize("model,change,fragment", WRONG_FIELDS, ids=[f[2].split()[0] for f in WRONG_FIELDS])
def test_new_family_field_of_the_wrong_type_exits_2_naming_it(checkpoint, model, change, fragment):
    path = checkpoint(model)
    edit_config(path, **change)
    result = CliRunner().invoke(main, ["audit", str(path), "-q"], catch_exceptions=False)
    assert result.exit_code == 2 and "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.stderr.startswith("llmdiff: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert f"config.json: {fragment}" in result.stderr
