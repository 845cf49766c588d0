"""Token ids for a run.

Until a tokenizer is wired in, prompts are synthetic ids: deterministic, BOS first, and
never a special id (DeepMind's code treats id 0 as padding). Two prompts by default: a short
one and a long one, which reaches larger RoPE positions (and, for windowed families, goes
past the sliding window).
"""

from __future__ import annotations

import hashlib

import numpy as np

from llmdiff.spec import ModelSpec

DEFAULT_LENGTHS = (24, 96)
FIRST_ORDINARY_ID = 4  # 0 pad, 1 eos, 2 bos, 3 unk


def synthetic_prompts(spec: ModelSpec, seed: int = 0, lengths=DEFAULT_LENGTHS) -> list[list[int]]:
    prompts = []
    for j, n in enumerate(lengths):
        digest = hashlib.sha256(f"prompt:{seed}:{j}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        body = rng.integers(FIRST_ORDINARY_ID, spec.vocab_size, size=n - 1)
        prompts.append([spec.bos_id, *map(int, body)])
    return prompts
