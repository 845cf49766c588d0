"""Files for the synthetic checkpoints the audit tests (and bench/audit_full.py) write."""

from __future__ import annotations

import json
from pathlib import Path


def write_example_tokenizer_files(path, spec, *, chat: bool = True) -> None:
    """Gemma-like tokenizer, special-token and generation files for a synthetic checkpoint
    (tests and the bench): ids as in Gemma's tokenizer (<pad> 0, <eos> 1, <bos> 2, <unk> 3,
    <start_of_turn> 106, <end_of_turn> 107), other rows named tok{i}."""
    path = Path(path)
    rows = spec.text_vocab_size
    special = {"<pad>": spec.pad_id, "<eos>": spec.eos_id, "<bos>": spec.bos_id, "<unk>": 3,
               "<start_of_turn>": 106, "<end_of_turn>": 107}
    names = {i: t for t, i in special.items()}
    vocab = {names.get(i, f"tok{i}"): i for i in range(rows)}
    tokenizer = {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []},
                 "added_tokens": [{"id": i, "content": t, "special": True} for t, i in special.items()]}
    tokens = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
              "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
    tokenizer_config = dict(tokens)
    eos = [spec.eos_id]
    if chat:
        tokenizer_config["chat_template"] = (
            "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
            "{{ m['content'] }}<end_of_turn>\n{% endfor %}")
        eos.append(special["<end_of_turn>"])
    generation = {"bos_token_id": spec.bos_id, "eos_token_id": eos, "pad_token_id": spec.pad_id}
    for name, data in (("tokenizer.json", tokenizer), ("tokenizer_config.json", tokenizer_config),
                       ("special_tokens_map.json", tokens), ("generation_config.json", generation)):
        (path / name).write_text(json.dumps(data, indent=1) + "\n")

