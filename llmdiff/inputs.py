"""Token ids for a run.

Without a tokenizer, prompts are synthetic ids: deterministic, BOS first (where the family
adds one), and
never a special id (DeepMind's code treats id 0 as padding). Two prompts by default: a short
one and a long one, which reaches larger RoPE positions and is longer than every tiny spec's
sliding window (`spec.TINY_SLIDING_WINDOW`), so local layers really slide.
"""

from __future__ import annotations

import hashlib

import numpy as np

from llmdiff.spec import ModelSpec

DEFAULT_LENGTHS = (24, 192)
FIRST_ORDINARY_ID = 4  # 0 pad, 1 eos, 2 bos, 3 unk


def synthetic_prompts(spec: ModelSpec, seed: int = 0, lengths=DEFAULT_LENGTHS) -> list[list[int]]:
    prompts = []
    for j, n in enumerate(lengths):
        digest = hashlib.sha256(f"prompt:{seed}:{j}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        # Only ids every implementation's table has (not DeepMind's padding rows of Gemma 2).
        body = rng.integers(FIRST_ORDINARY_ID, spec.text_vocab_size, size=n - 1 if spec.add_bos else n)
        prompts.append([spec.bos_id] * spec.add_bos + list(map(int, body)))
    return prompts


# Real text prompts, for checkpoints with a tokenizer (`llmdiff.tokenizer.Prompts`): a chat turn
# in the Gemma format (turn markers are ordinary pieces of Gemma's tokenizer.model) and prose
# long enough for the long prompt's length.
TEXT_PROMPTS = (
    "<start_of_turn>user\nWhat is the capital of France? Answer in one word.<end_of_turn>\n"
    "<start_of_turn>model\n",
    "The tokenizer turns text into pieces and pieces into ids; the model reads those ids one at a time. "
    "In 2024 the team compared 3 implementations of the same model on 12 prompts, layer by layer, and "
    "found that two of them disagreed before the first layer: one added a second beginning-of-sequence "
    "token, the other collapsed runs of spaces   like these. Numbers such as 3.14159 and 1,234,567 were "
    "split into single digits by both. Code was harder:\n    def f(x):\n        return x * 2\n"
    "Once the inputs agreed, every remaining difference was in the numerics, where it belongs. "
    "The long prompt goes on so that positions grow large and local attention windows really slide.",
)


def text_prompts(spec: ModelSpec, encode, lengths=DEFAULT_LENGTHS) -> list[list[int]]:
    """[BOS] + `encode(text)` for each of `TEXT_PROMPTS`: the chat turn whole (up to 48 ids), the
    prose cut to `lengths[1]` ids (it is long enough to fill them with any Gemma vocabulary)."""
    prompts = []
    for text, n in zip(TEXT_PROMPTS, (max(lengths[0], 48), *lengths[1:])):
        ids = [spec.bos_id, *map(int, encode(text))]
        prompts.append(ids[:n])
    return prompts
