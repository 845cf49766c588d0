"""Adapter for llama.cpp, through llama-cpp-python's ctypes API (`--impl llamacpp`).

`load` does what a llama.cpp user does with an HF checkpoint: llama.cpp's own converter,
`convert_hf_to_gguf.py` from the same llama-cpp-python sdist (copied into the venv at install),
turns the run's HF checkpoint (`self.job.weights.hf_dir`) into an F32 GGUF for float32 runs and
a BF16 GGUF for bfloat16 runs (`--outtype f32|bf16`; the converter keeps norms and 1-D tensors
in F32 either way), and llama.cpp loads it on the CPU. A checkpoint without a tokenizer, or with
one the converter cannot read (the tokenizer.json transformers 5 writes for llmdiff's tiny
checkpoints, a BPE pre-tokenizer it does not know), is converted from a staging directory of
links to its config and weights with a stand-in SentencePiece model (`vocab_size` pieces, the
spec's special ids): tokens are fed as ids, never tokenized, so the vocab only has to exist;
`describe()["vocab"]` says which was used. Seeded weights (`WeightsSource.seed`, full-size random
models) are refused: llama.cpp reads a file, so give `--weights` or a checkpoint.

`run` decodes the prompt as one batch (n_batch = n_ubatch = the prompt's length, logits for
every position, KV cache in the run's dtype: F32 or BF16, not llama.cpp's F16 default, flash
attention as llama.cpp picks it) and reads activations through the scheduler's evaluation
callback (`llama_context_params.cb_eval`, as llama.cpp's `examples/eval-callback` does): it
asks for every node, so each is computed where it can be read, and copies every F32 node (by
`ne`/`nb`, views included). Logits are `llama_get_logits`. Mapping, per layer i (ggml names
are `NAME-i`; weights `blk.i.*`):

| canonical | llama.cpp node |
|---|---|
| `embed` | `inp_scaled` (Gemma: rows times sqrtf(D) in F32), else the GET_ROWS of `token_embd.weight` |
| `L{i}.attn_norm` | `attn_norm-i` (the MUL by `blk.i.attn_norm.weight`) |
| `L{i}.q`, `L{i}.k` | the ROPE nodes named `Qcur-i`, `Kcur-i` (after Qwen2's bias, Gemma 3/Qwen3's q/k norm), (T, N, H); Llama and Mistral: put back from llama.cpp's interleaved pairs into HF's halves |
| `L{i}.v` | the last node named `Vcur-i` (the projection, with its bias), (T, K, H) |
| `L{i}.attn_out` | the MUL_MAT by `blk.i.attn_output.weight` |
| `L{i}.post_attn_norm` | `attn_post_norm-i` (Gemma 2/3) |
| `L{i}.resid_mid` | `ffn_inp-i` (Llama-like), `sa_out-i` (Gemma) |
| `L{i}.mlp_norm` | `ffn_norm-i` |
| `L{i}.mlp_gate`, `L{i}.mlp_up` | the MUL_MATs by `blk.i.ffn_gate.weight`, `blk.i.ffn_up.weight` |
| `L{i}.mlp_act` | the input of the MUL_MAT by `blk.i.ffn_down.weight` (`ffn_geglu-i`/`ffn_swiglu-i`) |
| `L{i}.mlp_out` | the MUL_MAT by `blk.i.ffn_down.weight` |
| `L{i}.post_mlp_norm` | the MUL by `blk.i.post_ffw_norm.weight` (Gemma 2 names it `ffn_post_norm` without a layer) |
| `L{i}.out` | `l_out-i` |
| `final_norm` | `result_norm` |
| `logits` | `llama_get_logits` (after Gemma 2's final soft-cap), the first `text_vocab_size` columns |

A point whose node is absent (a graph that fuses it away, a family whose graph names it
otherwise) is left out and reported missing. In bfloat16 runs llama.cpp computes in F32 with
BF16 weights (the CPU matmul rounds its activation operand to BF16): not the same rounding as
a bfloat16 PyTorch or JAX model, so expect differences the noise floor does not cover.
The implementation lives in a virtualenv of its own: `python -m llmdiff.references.llamacpp install`
(llama-cpp-python built from its sdist once per machine into llmdiff's wheel cache, ~/.cache/llmdiff/wheels;
later installs reuse that wheel).

What tiny models show (llama-cpp-python 0.3.36, CPU, F32 GGUF, F32 KV cache), each from the
place in llama.cpp's code:
- Flash attention (llama.cpp's default `auto` turns it on on the CPU) casts an F32 K and V to
  F16 before `ggml_flash_attn_ext` (src/llama-graph.cpp, `build_attn_mha`): every family's
  first divergence is `L0.attn_out` at rel L2 ~3.5e-4; with `LLMDIFF_LLAMACPP_FLASH_ATTN=off`
  attention is at parity. The CPU kernel (ggml/src/ggml-cpu/ops.cpp) is the tiled one from 64
  query rows (F32 q, F16 K and V: K and V rounded alone, to 1.9e-7) and the one-chunk one below
  (q at F16 too, an F16 V accumulator): LD511 kv-rounded-to-f16 names both (`kv_f16`,
  `kv_f16_short`).
- GELU on the CPU is a 65536-entry F16 table read at the F16 rounding of its input
  (ggml/src/ggml-cpu/vec.h: `GGML_GELU_FP16`, `ggml_vec_geglu_f32`, `ggml_vec_gelu_f32`): Gemma
  1/2/3's `mlp_act` is off by rel L2 ~3e-4 while everything before it is at parity (LD302
  gelu-f16-table). SwiGLU (Llama, Qwen, Mistral) computes
  SiLU in F32: Llama 3.1, Qwen 2.5 and Qwen 3 are at parity at every point with flash attention off.
- Mistral converts as the `llama` architecture: the converter writes no window and the graph
  (src/models/llama.cpp, `build_attn_inp_kv`) has no sliding-window mask, so every layer attends
  fully; LD508 sliding-window-not-applied names it (confirmed), `llmdiff audit` on the GGUF as
  LD708. It matters past 4096 tokens for Mistral 7B v0.1.
- bfloat16 (BF16 GGUF): llama.cpp keeps activations and the residual stream in F32, so only
  Gemma's `embed` (rows times sqrt(D), not rounded to bfloat16) is outside the bfloat16 floor;
  every later point is within it.
- `--quant q8_0` (`Job.quant`): the converter writes `--outtype q8_0` (every 2-D weight Q8_0,
  norms F32; `check_quantised_as_oracle` checks that against the oracle's set), llama.cpp runs it
  with an F32 KV cache, and the reference is the oracle quantised the same way: its weights
  round-tripped as the converter does (llmdiff/quant.py, bit-exact with gguf.quants) and the
  activation operand of each weight matmul rounded to Q8_0 blocks as ggml's CPU matmul does
  (`vec_dot_type` of Q8_0 is Q8_0, `quantize_row_q8_0`: `Precision.matmul_q8_0`). Fed llama.cpp's
  own `L0.attn_norm`, that rounding reproduces its `L0.v` to 9e-8; every point is within the
  quantised oracle's own float32-vs-float64 floor (tiny Llama 3.1 and Gemma), so the run is
  judged per point like a float one.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from llmdiff.references.base import MissingExtra, Reference

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
INSTALL = "python -m llmdiff.references.llamacpp install"
VENV_NAME = "llamacpp"
GGML_TYPE_F32, GGML_TYPE_BF16 = 0, 30
_OUTTYPE = {"float32": "f32", "bfloat16": "bf16"}
FLASH_ATTN_ENV = "LLMDIFF_LLAMACPP_FLASH_ATTN"
_KV_TYPE = {"float32": GGML_TYPE_F32, "bfloat16": GGML_TYPE_BF16}


class _GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor` (ggml/include/ggml.h of the vendored llama.cpp): GGML_MAX_DIMS 4,
    GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10, GGML_MAX_NAME 64."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def _array(t: _GgmlTensor) -> np.ndarray | None:
    """A copy of an F32 tensor's values, numpy order (ne reversed), views by their strides."""
    if t.type != GGML_TYPE_F32 or not t.data:
        return None
    ne = [int(n) for n in t.ne]
    nb = [int(n) for n in t.nb]
    count = (sum((n - 1) * b for n, b in zip(ne, nb)) + 4) // 4   # F32 strides are multiples of 4
    base = np.frombuffer((ctypes.c_float * count).from_address(t.data), dtype=np.float32)
    view = np.lib.stride_tricks.as_strided(base, shape=tuple(reversed(ne)), strides=tuple(reversed(nb)))
    return np.array(view, dtype=np.float32)


class _Node:
    __slots__ = ("name", "srcs", "value")

    def __init__(self, name, srcs, value):
        self.name, self.srcs, self.value = name, srcs, value


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        if getattr(exc, "name", None) and exc.name.split(".")[0] != "llama_cpp" and "llama_cpp" in sys.modules:
            raise
        raise MissingExtra(f"implementation 'llamacpp' needs the llamacpp extra: {INSTALL}") from None
    if llama_cpp.__version__ != LLAMA_CPP_PYTHON_VERSION:
        raise MissingExtra(f"implementation 'llamacpp' needs llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}"
                           f" (found {llama_cpp.__version__}): {INSTALL}")
    return llama_cpp


def converter_dir() -> Path:
    """Where `install` put llama.cpp's converter: this interpreter's venv, share/llama.cpp."""
    return Path(sys.prefix) / "share" / "llama.cpp"


def stand_in_tokenizer(path: Path, spec) -> None:
    """A SentencePiece model with `spec.vocab_size` pieces and the spec's special ids: the
    converter needs a vocab to write one; the run feeds ids."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    m.trainer_spec.vocab_size = spec.vocab_size
    special = {}
    for attr, text, kind in (("unk_id", "<unk>", pb.ModelProto.SentencePiece.UNKNOWN),
                             ("bos_id", "<bos>", pb.ModelProto.SentencePiece.CONTROL),
                             ("eos_id", "<eos>", pb.ModelProto.SentencePiece.CONTROL),
                             ("pad_id", "<pad>", pb.ModelProto.SentencePiece.CONTROL)):
        i = getattr(spec, attr, None)
        if i is not None and 0 <= i < spec.vocab_size and i not in special:
            special[i] = (text, kind)
            setattr(m.trainer_spec, attr, i)
        else:
            setattr(m.trainer_spec, attr, -1)
    if not any(kind == pb.ModelProto.SentencePiece.UNKNOWN for _, kind in special.values()):
        free = next(i for i in range(spec.vocab_size) if i not in special)
        special[free] = ("<unk>", pb.ModelProto.SentencePiece.UNKNOWN)
        m.trainer_spec.unk_id = free
    for i in range(spec.vocab_size):
        p = m.pieces.add()
        p.piece, p.type = special.get(i, (f"t{i}", pb.ModelProto.SentencePiece.NORMAL))
        p.score = 0.0 if i in special else -float(i)
    path.write_bytes(m.SerializeToString())


_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


def _run_converter(src: Path, out: Path, outtype: str) -> str | None:
    """None when convert_hf_to_gguf.py wrote `out`, else the end of what it said."""
    script = converter_dir() / "convert_hf_to_gguf.py"
    proc = subprocess.run([sys.executable, str(script), str(src), "--outfile", str(out), "--outtype",
                           outtype], capture_output=True, text=True)
    if proc.returncode == 0 and out.exists():
        return None
    lines = [line.strip() for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def convert(hf_dir: str, out: Path, outtype: str, spec) -> tuple[Path, str]:
    """llama.cpp's convert_hf_to_gguf.py on the checkpoint, run under this interpreter; returns
    (the GGUF, where its vocab came from). A checkpoint without a tokenizer, or one the converter
    cannot read (a tiny checkpoint's tokenizer.json written by transformers 5, a BPE
    pre-tokenizer it does not know), is converted from a staging directory of links to its
    config and weights with a stand-in tokenizer.model: runs feed ids, never text."""
    outtype = _OUTTYPE.get(outtype, outtype)   # a run dtype (float32) or an --outtype (q8_0)
    script = converter_dir() / "convert_hf_to_gguf.py"
    if not script.exists():
        raise MissingExtra(f"implementation 'llamacpp': no converter at {script}: {INSTALL}")
    src = Path(hf_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    why = "the checkpoint has no tokenizer"
    if (src / "tokenizer.model").exists() or (src / "tokenizer.json").exists():
        why = _run_converter(src, out, outtype)
        if why is None:
            return out, "the checkpoint's tokenizer"
    stage = out.parent / "checkpoint"
    stage.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        link = stage / f.name
        if f.name not in _TOKENIZER_FILES and not link.exists():
            link.symlink_to(f.resolve())
    stand_in_tokenizer(stage / "tokenizer.model", spec)
    failed = _run_converter(stage, out, outtype)
    if failed is not None:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_dir}: {failed}")
    return out, f"a stand-in SentencePiece model ({why})"


def gguf_tensor_types(path) -> dict[str, list[str]]:
    """The GGUF's tensors by type ("Q8_0": [names], "F32": [...]), as its writer chose them."""
    import gguf

    types: dict[str, list[str]] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        types.setdefault(t.tensor_type.name, []).append(t.name)
    return types


# GGUF tensor names (llama.cpp's gguf-py TENSOR_NAMES) -> canonical names (llmdiff/convert.py)
_GGUF_TO_CANONICAL = {"token_embd": "embed", "output": "lm_head", "attn_q": "q", "attn_k": "k", "attn_v": "v",
                      "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down"}


def check_quantised_as_oracle(tensor_types: dict, quant: str, spec) -> None:
    """The converter quantised exactly the tensors the oracle rounds (`llmdiff.quant.round_trip`),
    else the quantised oracle is not this GGUF's model: an error, not a verdict."""
    from llmdiff import convert, quant as quant_mod

    def canonical(name):
        parts = name.split(".")
        if parts[0] == "blk":
            base = _GGUF_TO_CANONICAL.get(parts[2])
            return f"L{parts[1]}.{base}" if base else name
        return _GGUF_TO_CANONICAL.get(parts[0], name)

    written = {canonical(n) for n in tensor_types.get(quant.upper(), [])}
    shapes = convert.canonical_shapes(spec)
    rounded = {n for n in shapes if n.split(".")[-1] in quant_mod.REDUCTION_AXES
               and len(shapes[n]) > 1 and np.prod([shapes[n][a] for a in quant_mod.REDUCTION_AXES[n.split(".")[-1]]]) % 32 == 0}
    if written != rounded:
        raise RuntimeError(f"llama.cpp's converter wrote {quant.upper()} for {sorted(written - rounded) or 'no other'} tensors"
                           f" and not for {sorted(rounded - written) or 'none'} of those the oracle rounds")


class LlamaCppReference(Reference):
    name = "llamacpp"
    package = "llama-cpp-python"
    dtypes = ("float32", "bfloat16")

    def __init__(self, job):
        super().__init__(job)
        self.lib = _import_llama_cpp()
        self.model = None
        self.gguf_path = None
        self.vocab_source = None
        self._quiet = self.lib.llama_log_callback(lambda level, text, data: None)
        self.lib.llama_log_set(self._quiet, None)
        self.lib.llama_backend_init()

    def versions(self):
        from importlib import metadata

        return {"llama-cpp-python": self.lib.__version__, "gguf": metadata.version("gguf")}

    def load(self, request):
        self._free()
        dtype = request.dtype
        if dtype not in _OUTTYPE:
            raise ValueError(f"llamacpp runs float32 (F32 GGUF) and bfloat16 (BF16 GGUF), not {dtype}")
        quant = self.job.quant
        if quant and dtype != "float32":
            raise ValueError(f"--quant {quant} runs in float32 (F32 activations and KV cache), not {dtype}")
        outtype = quant or _OUTTYPE[dtype]
        w = self.job.weights
        if w.generated or not w.hf_dir:
            raise ValueError("llamacpp converts an HF checkpoint with llama.cpp's converter; weights made"
                             " from a seed have none: give --weights DIR or compare a checkpoint")
        out = Path(request.out).parent / "llamacpp" / f"model-{outtype}.gguf"
        self.gguf_path, self.vocab_source = convert(w.hf_dir, out, outtype, self.spec)
        self.outtype, self.tensor_types = outtype, gguf_tensor_types(self.gguf_path)
        if quant:
            check_quantised_as_oracle(self.tensor_types, quant, self.spec)
        lib = self.lib
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(self.gguf_path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {self.gguf_path}")
        self.dtype = dtype

    def _free(self):
        if self.model:
            self.lib.llama_model_free(self.model)
        self.model = None

    def _flash_attn(self) -> int:
        """llama.cpp's flash attention setting: $LLMDIFF_LLAMACPP_FLASH_ATTN (auto, on, off;
        default auto, llama.cpp's own default, which turns it on on the CPU)."""
        lib = self.lib
        value = os.environ.get(FLASH_ATTN_ENV, "auto").strip().lower()
        choices = {"auto": lib.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                   "off": lib.LLAMA_FLASH_ATTN_TYPE_DISABLED}
        if value not in choices:
            raise ValueError(f"${FLASH_ATTN_ENV}={value!r}: choose auto, on or off")
        return choices[value]

    def _decode(self, tokens, capture: bool):
        lib = self.lib
        n = len(tokens)
        nodes: dict[int, _Node] = {}
        order: list[int] = []

        def on_eval(t_ptr, ask, user_data):
            if ask:
                return capture
            t = _GgmlTensor.from_address(t_ptr)
            # sources by address and name, read now: the graph's tensors go with the context
            srcs = tuple((s, _GgmlTensor.from_address(s).name.decode(errors="replace")) for s in t.src if s)
            nodes[t_ptr] = _Node(t.name.decode(errors="replace"), srcs, _array(t))
            order.append(t_ptr)
            return True

        callback = lib.ggml_backend_sched_eval_callback(on_eval)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = max(n, 16)
        cparams.n_batch = cparams.n_ubatch = max(n, 1)
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = max(1, os.cpu_count() or 1)
        cparams.type_k = cparams.type_v = _KV_TYPE[self.dtype]
        cparams.cb_eval = callback
        cparams.flash_attn_type = self._flash_attn()
        cparams.cb_eval_user_data = None
        ctx = lib.llama_init_from_model(self.model, cparams)
        if not ctx:
            raise RuntimeError("llama.cpp could not make a context")
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i, tok in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(tok), i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            rc = lib.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
            ptr = lib.llama_get_logits(ctx)
            logits = np.ctypeslib.as_array(ptr, shape=(n * n_vocab,)).reshape(n, n_vocab).copy()
        finally:
            lib.llama_batch_free(batch)
            lib.llama_free(ctx)
        return logits, nodes, order

    def run(self, tokens):
        logits, nodes, order = self._decode(tokens, capture=True)
        spec = self.spec
        vocab = getattr(spec, "text_vocab_size", spec.vocab_size)
        cap = {name: a[None] for name, a in self._map(nodes, order, len(tokens)).items() if self.wants(name)}
        cap["logits"] = logits[None, :, :vocab]
        return cap

    def _map(self, nodes, order, n_tokens):
        """Canonical points from the evaluated nodes (module docstring's table)."""
        spec = self.spec
        by_name: dict[str, list[int]] = {}
        for p in order:
            by_name.setdefault(nodes[p].name, []).append(p)
        consumers: dict[str, list[int]] = {}  # a leaf's name (a weight, an input) -> the nodes that read it
        for p in order:
            for s, name in nodes[p].srcs:
                if s not in nodes:
                    consumers.setdefault(name, []).append(p)

        def value(p, shape=None):
            v = nodes[p].value if p is not None and p in nodes else None
            if v is None:
                return None
            try:
                return v.reshape(shape) if shape is not None else v.reshape(n_tokens, -1)
            except ValueError:
                return None

        def last(name):
            ps = by_name.get(name)
            return ps[-1] if ps else None

        def using(weight):  # the (last) node computed from a weight
            ps = consumers.get(weight)
            return ps[-1] if ps else None

        # Llama and Mistral convert as llama.cpp's `llama` architecture, whose RoPE rotates
        # adjacent pairs: the converter permutes q_proj and k_proj rows per head
        # (LlamaModel.permute: half h, index i -> 2i + h). Put q and k back in HF's order.
        interleaved = spec.family in ("llama", "mistral")

        def unpermute(v):
            if v is None or not interleaved:
                return v
            return v.reshape(*v.shape[:-1], v.shape[-1] // 2, 2).swapaxes(-1, -2).reshape(v.shape)

        out = {}
        gemma = spec.embed_scale != "none"
        put = lambda key, v: out.__setitem__(key, v) if v is not None else None
        # the token rows: the first node reading the table (a tied head reads it last)
        rows = consumers.get("token_embd.weight", [None])[0]
        put("embed", value(last("inp_scaled") if gemma else rows))
        N, K, H = spec.num_heads, spec.num_kv_heads, spec.head_dim
        for i in range(spec.num_layers):
            c, b = f"L{i}.", f"blk.{i}."
            put(c + "attn_norm", value(using(b + "attn_norm.weight")))
            put(c + "q", unpermute(value(last(f"Qcur-{i}"), (n_tokens, N, H))))
            put(c + "k", unpermute(value(last(f"Kcur-{i}"), (n_tokens, K, H))))
            put(c + "v", value(last(f"Vcur-{i}"), (n_tokens, K, H)))
            put(c + "attn_out", value(using(b + "attn_output.weight")))
            if spec.post_attn_norm:
                put(c + "post_attn_norm", value(using(b + "post_attention_norm.weight")))
            put(c + "resid_mid", value(last(f"sa_out-{i}") if gemma and last(f"sa_out-{i}") is not None
                                       else last(f"ffn_inp-{i}")))
            put(c + "mlp_norm", value(using(b + "ffn_norm.weight")))
            put(c + "mlp_gate", value(using(b + "ffn_gate.weight")))
            put(c + "mlp_up", value(using(b + "ffn_up.weight")))
            down = using(b + "ffn_down.weight")
            if down is not None:
                act = next((s for s, _ in nodes[down].srcs if s in nodes), None)
                put(c + "mlp_act", value(act))
            put(c + "mlp_out", value(down))
            if spec.post_mlp_norm:
                put(c + "post_mlp_norm", value(using(b + "post_ffw_norm.weight")))
            put(c + "out", value(last(f"l_out-{i}")))
        put("final_norm", value(using("output_norm.weight")))
        return out

    def describe(self):
        return {
            "model": "llama.cpp (llama-cpp-python ctypes API): llama_model_load_from_file, llama_decode",
            "gguf": str(self.gguf_path) if self.gguf_path else None,
            "converter": "convert_hf_to_gguf.py --outtype " + getattr(self, "outtype", "?"),
            "tensor_types": {k: len(v) for k, v in (getattr(self, "tensor_types", None) or {}).items()},
            "vocab": getattr(self, "vocab_source", None),
            "kv_cache": getattr(self, "dtype", None),
            "flash_attn": os.environ.get(FLASH_ATTN_ENV, "auto"),
            "device": "cpu",
        }


# --- installation -----------------------------------------------------------------------

def lock_file():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "constraints" / "llamacpp.txt"


def _pinned(lock, name: str) -> str:
    for line in lock.read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.strip()
    raise SystemExit(f"llmdiff: error: {lock} pins no {name}")


# The CPU build of the library alone: no llava/mtmd, no tools, tests or examples.
CMAKE_ARGS = ("-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF",
              "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF")


def wheel_cache_root() -> Path:
    """llmdiff's wheel cache: $XDG_CACHE_HOME/llmdiff/wheels, else ~/.cache/llmdiff/wheels. Not
    under $LLMDIFF_VENVS (CI points that at a temporary directory; the wheel outlives venvs)."""
    from llmdiff.runner import cache_dir

    return Path(cache_dir("wheels"))


def _cpu_signature() -> str:
    """What the build's -march=native saw (ggml's GGML_NATIVE is on by default): the CPU flags
    on Linux, the machine name elsewhere. A wheel built for another CPU may not run here."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine()


def wheel_key(version: str, cmake_args, python_tag: str, platform_tag: str, cpu: str) -> str:
    """The cache entry's name: llama-cpp-python's version, the CMAKE_ARGS, the Python tag, the
    platform and the CPU the build targets (the last three hashed with the CMAKE_ARGS)."""
    import hashlib

    digest = hashlib.sha256("\n".join([" ".join(cmake_args), python_tag, platform_tag, cpu]).encode()).hexdigest()
    return f"llama_cpp_python-{version}-{python_tag}-{platform_tag}-{digest[:16]}"


def cached_wheel(entry: Path) -> Path | None:
    wheels = sorted(entry.glob("*.whl")) if entry.is_dir() else []
    return wheels[0] if wheels else None


def build_wheel_into_cache(python: str, src: Path, entry: Path, env: dict, quiet: bool) -> Path:
    """`pip wheel --no-deps SRC` into a temporary directory beside `entry`, then renamed to
    `entry` (atomic on one filesystem: a reader sees no entry or a whole one). When another
    install got there first, its wheel is used and this one dropped."""
    import shutil
    import tempfile

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".", suffix=".tmp", dir=entry.parent))
    try:
        subprocess.run([python, "-m", "pip", "wheel", *(["-q"] if quiet else []), "--no-deps",
                        "--no-cache-dir", str(src), "-w", str(tmp)], check=True, env=env)
        if cached_wheel(tmp) is None:
            raise RuntimeError(f"pip wheel wrote no wheel into {tmp}")
        try:
            os.rename(tmp, entry)
        except OSError:
            if cached_wheel(entry) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cached_wheel(entry)


def install(venvs_root=None, quiet: bool = False, wheels=None) -> str:
    """Create the `llamacpp` virtualenv: llama-cpp-python for the CPU, the converter's
    dependencies, and the converter itself (convert_hf_to_gguf.py and its `conversion` package,
    copied from llama-cpp-python's sdist into VENV/share/llama.cpp). llama-cpp-python is built
    from its sdist once per machine into llmdiff's wheel cache (`wheels`, default
    `wheel_cache_root()`, keyed by `wheel_key`); later installs install that wheel. Returns the
    venv's interpreter."""
    import shutil
    import sysconfig
    import tarfile
    import tempfile
    import time
    import venv as venv_mod

    from llmdiff.runner import venvs_root as default_root

    lock = lock_file()
    if not lock.exists():
        raise SystemExit(f"llmdiff: error: {lock} not found (install llmdiff from its source tree: pip install -e .)")
    venv = Path(venvs_root or default_root()) / VENV_NAME
    if venv.exists():
        shutil.rmtree(venv)
    q = ["-q"] if quiet else []
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    pinned = _pinned(lock, "llama-cpp-python")
    # the venv is made from this interpreter: its Python tag and platform are this one's
    python_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    entry = Path(wheels or wheel_cache_root()) / wheel_key(
        pinned.split("==")[1], CMAKE_ARGS, python_tag, sysconfig.get_platform(), _cpu_signature())
    wheel = cached_wheel(entry)
    if wheel is None:
        print(f"llamacpp: building llama-cpp-python from source, once on this machine (about 10 minutes"
              f" on 2 cores); the wheel is kept in {entry}", file=sys.stderr)
    t0 = time.perf_counter()
    built = False
    try:
        venv_mod.create(venv, with_pip=True)
        pip = [str(python), "-m", "pip", "install", *q, "-c", str(lock)]
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([str(python), "-m", "pip", "download", *q, "--no-deps", "--no-binary", ":all:",
                            "-d", tmp, pinned], check=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            src = next(p for p in Path(tmp).iterdir() if p.is_dir())
            env = dict(os.environ, CMAKE_ARGS=" ".join(CMAKE_ARGS),
                       CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
            others = [line.strip() for line in lock.read_text().splitlines()
                      if line.strip() and not line.startswith("#") and not line.startswith("llama-cpp-python")]
            subprocess.run([*pip, *others], check=True)
            t1 = time.perf_counter()
            if wheel is None:
                wheel = build_wheel_into_cache(str(python), src, entry, env, quiet)
                built = True
            subprocess.run([*pip, str(wheel)], check=True)
            t2 = time.perf_counter()
            # The converter needs the gguf-py it ships with (PyPI's gguf of the same version
            # number lacks architectures the converter imports: MODEL_ARCH.DFLASH in 0.3.36).
            subprocess.run([*pip, "--no-deps", "--force-reinstall", str(src / "vendor" / "llama.cpp" / "gguf-py")],
                           check=True)
            share = venv / "share" / "llama.cpp"
            share.mkdir(parents=True)
            vendor = src / "vendor" / "llama.cpp"
            shutil.copy2(vendor / "convert_hf_to_gguf.py", share / "convert_hf_to_gguf.py")
            if (vendor / "conversion").is_dir():
                shutil.copytree(vendor / "conversion", share / "conversion")
        subprocess.run([str(python), "-c", "import llama_cpp, gguf, torch, transformers"], check=True)
    except (subprocess.CalledProcessError, KeyboardInterrupt, StopIteration, RuntimeError):
        shutil.rmtree(venv, ignore_errors=True)  # never leave a half-built venv for the runner to pick
        raise SystemExit("llmdiff: error: installing the llamacpp extra failed (see above)") from None
    how = "built into the wheel cache" if built else f"installed from the cached wheel {wheel}"
    print(f"llamacpp: dependencies {t1 - t0:.0f} s, llama-cpp-python {t2 - t1:.0f} s ({how}),"
          f" total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return str(python)


if __name__ == "__main__":
    from llmdiff.references.base import install_main

    install_main("llamacpp", f"Install llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} (CPU) and llama.cpp's converter into"
                             " llmdiff's 'llamacpp' virtualenv; the first install on a machine builds llama-cpp-python"
                             " from source (about 10 minutes) into llmdiff's wheel cache, later ones reuse it.", install,
                 [("--wheels=DIR", "llmdiff's wheel cache, where the llama-cpp-python wheel is built once"
                                   " (default: $XDG_CACHE_HOME/llmdiff/wheels or ~/.cache/llmdiff/wheels)")])
