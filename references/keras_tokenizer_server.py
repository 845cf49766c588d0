"""keras-hub's Gemma tokenizer, served from the keras virtualenv to tokenizer parity in the core.

Run by `keras_gemma.keras_tokenizers` as `PYTHON keras_tokenizer_server.py tokenizer.model FAMILY`
with the keras virtualenv's interpreter; it needs keras-hub and the standard library only (no
llmdiff). It builds the tokenizer a keras-hub user gets (`GemmaTokenizer` for Gemma 1 and 2,
`Gemma3Tokenizer` for Gemma 3, from the same tokenizer.model, as keras-hub's own HF converter
does, `has_vision_tokens` as it decides it) in its two workflows:

- `keras`: the default eager path (keras-hub 0.32: native `sentencepiece`, no TensorFlow);
- `keras-tf`: the path `tf.data` pipelines and `tf.function` take (tensorflow-text's
  `SentencepieceTokenizer`), here forced by `_allow_python_workflow=False`; only where
  tensorflow-text is installed (`keras_gemma install --tensorflow-text`).

`encode` is what `causal_lm.generate(text)` feeds the model: the CausalLM preprocessor's
`generate_preprocess(text)` ids under its padding mask; `encode_text` is `tokenizer(text)`.
Protocol: one JSON line out first ({"hello": ...}), then one JSON request line in
({"impl", "op", "arg"}), one JSON line out ({"ok": value} or {"error": message}), until EOF.
"""

from __future__ import annotations

import json
import os
import sys


def _ids(x) -> list[int]:
    import numpy as np

    return [int(i) for i in np.asarray(x).reshape(-1)]


def _text(x) -> str:
    if hasattr(x, "numpy"):
        x = x.numpy()
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        x = x.item()
    return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)


def main(model_file: str, family: str) -> None:
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")  # replies only: whatever else prints goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import keras_hub
    import sentencepiece as spm

    models = keras_hub.models
    gemma3 = family == "gemma3"
    cls = models.Gemma3Tokenizer if gemma3 else models.GemmaTokenizer
    pre_cls = models.Gemma3CausalLMPreprocessor if gemma3 else models.GemmaCausalLMPreprocessor
    kwargs = {}
    if gemma3:  # as keras-hub's convert_gemma3.load_tokenizer decides it
        sp = spm.SentencePieceProcessor(model_file=model_file)
        kwargs["has_vision_tokens"] = all(sp.PieceToId(t) != sp.unk_id()
                                          for t in ("<start_of_image>", "<img>", "<end_of_image>"))
    versions = {"keras-hub": keras_hub.__version__, "keras": keras.__version__, "sentencepiece": spm.__version__}
    tokenizers, reasons = {"keras": cls(proto=model_file, **kwargs)}, {}
    try:
        import tensorflow as tf
        import tensorflow_text

        versions.update({"tensorflow": tf.__version__, "tensorflow-text": getattr(tensorflow_text, "__version__", None)})
        tokenizers["keras-tf"] = cls(proto=model_file, _allow_python_workflow=False, **kwargs)
    except ImportError as e:
        reasons["keras-tf"] = (f"keras-hub's tf.data path needs tensorflow-text, not installed in the keras virtualenv"
                               f" ({e}): python -m llmdiff.references.keras_gemma install --tensorflow-text")
    preprocessors = {}
    for name, tok in list(tokenizers.items()):
        try:
            preprocessors[name] = pre_cls(tokenizer=tok, **({"image_converter": None} if gemma3 else {}))
        except (ImportError, RuntimeError) as e:   # keras-hub 0.32's Gemma3CausalLMPreprocessor needs tensorflow
            del tokenizers[name]
            reasons[name] = (f"keras-hub's {pre_cls.__name__} cannot be built here ({str(e).splitlines()[0]}):"
                             f" python -m llmdiff.references.keras_gemma install --tensorflow-text")

    def encode(name, text):
        tok = tokenizers[name]
        n = len(_ids(tok(text))) + 4  # room for whatever the preprocessor adds (BOS, EOS)
        x = preprocessors[name].generate_preprocess(text, sequence_length=n)
        mask = [bool(m) for m in _ids(x["padding_mask"])]
        return [i for i, m in zip(_ids(x["token_ids"]), mask) if m]

    def piece(name, i):
        try:
            return str(tokenizers[name].id_to_token(int(i)))
        except ValueError:
            return str(i)

    ops = {"encode": encode,
           "encode_text": lambda name, text: _ids(tokenizers[name](text)),
           "decode": lambda name, ids: _text(tokenizers[name].detokenize(list(ids))),
           "piece": piece}
    hello = {"versions": versions, "implementations": sorted(tokenizers), "reasons": reasons,
             "class": cls.__name__, "preprocessor": pre_cls.__name__, **kwargs}
    out.write(json.dumps({"hello": hello}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            reply = {"ok": ops[req["op"]](req["impl"], req["arg"])}
        except Exception as e:  # noqa: BLE001 - one string's failure is that string's evidence
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
