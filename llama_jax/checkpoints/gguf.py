"""GGUF files (llama.cpp, Ollama, LM Studio: one file with the weights, often quantized, and the tokenizer, chat
template and special tokens in its metadata) -> config, parameter pytree, tokenizer files.

Reading and dequantizing are the `gguf` package's (llama.cpp's own Python reader): F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1 and the K-quants. The file is memory-mapped and read once: the metadata first (the reader's copy
of it, a vocabulary as ~100,000 small arrays, is dropped before any weight is read), then each tensor, dequantized
a few thousand rows at a time straight into its slot of the stacked arrays (the package's dequantization makes
several temporaries of its input's size), which JAX then takes without a copy (host_memory.aligned_empty).

llama.cpp stores q and k rows permuted for its interleaved RoPE; they are permuted back exactly as transformers'
GGUF reader does, into the split-halves layout model.py uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama_jax.config import ConfigError, ModelConfig
from llama_jax.errors import UserError
from llama_jax.host_memory import aligned_empty

ARCHITECTURES = ("llama", "mistral")  # the same tensors; mistral without a short sliding window
# ours -> (GGUF name, per layer), all [out, in] in the file except the norms
_LAYER_NAMES = {"attn_norm": "blk.{}.attn_norm.weight", "wq": "blk.{}.attn_q.weight", "wk": "blk.{}.attn_k.weight",
                "wv": "blk.{}.attn_v.weight", "wo": "blk.{}.attn_output.weight", "ffn_norm": "blk.{}.ffn_norm.weight",
                "w_gate": "blk.{}.ffn_gate.weight", "w_up": "blk.{}.ffn_up.weight", "w_down": "blk.{}.ffn_down.weight"}
_TOP_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head")
_DEQUANTIZABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


class GGUFError(ValueError, UserError):
    """A GGUF file that cannot be read as a Llama model; one line naming the file and what is unsupported."""


def is_gguf(path: str | Path) -> bool:
    """A file that starts with GGUF's magic bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return path.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


def open_gguf(path: str | Path):
    """The `gguf` package's reader over the file (memory-mapped), with one-line errors for a damaged file."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError, OverflowError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})") from None


def metadata(reader, prefix: str = "") -> dict:
    """The metadata under `prefix` (without it) as Python values; arrays become lists."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith(prefix) and not key.startswith("GGUF."):
            out[key[len(prefix):]] = field.contents()
    return out


def config_from_gguf(reader, path) -> ModelConfig:
    arch = metadata(reader, "general.").get("architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: general.architecture {arch!r} is not supported; supported: "
                        f"{', '.join(ARCHITECTURES)}")
    m = metadata(reader, f"{arch}.")
    need = ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")
    missing = [k for k in need if k not in m]
    if missing:
        raise GGUFError(f"{path}: metadata {arch}.{missing[0]} is missing")
    window, context = m.get("attention.sliding_window"), int(m.get("context_length", 2048))
    if window is not None and window < context:
        raise GGUFError(f"{path}: {arch}.attention.sliding_window={window} is shorter than the context {context}; "
                        "sliding-window attention is not supported")
    dim, n_heads = int(m["embedding_length"]), int(m["attention.head_count"])
    scaling = m.get("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFError(f"{path}: {arch}.rope.scaling.type {scaling!r} is not supported; supported: none, linear")
    extra = {"rope_factor": float(m["rope.scaling.factor"])} if scaling == "linear" else {}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(m.get("vocab_size") or (len(tokens.data) if tokens is not None else 0))
    head_dim = m.get("attention.key_length") or m.get("rope.dimension_count") or dim // n_heads
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise GGUFError(f"{path}: rope_freqs.weight (Llama 3.1's RoPE scaling as a tensor) is not supported")
    try:
        return ModelConfig(vocab_size=vocab, dim=dim, n_layers=int(m["block_count"]), n_heads=n_heads,
                           n_kv_heads=int(m.get("attention.head_count_kv") or n_heads), head_dim=int(head_dim),
                           ffn_dim=int(m["feed_forward_length"]), max_seq_len=context,
                           norm_eps=float(m.get("attention.layer_norm_rms_epsilon", 1e-5)),
                           rope_theta=float(m.get("rope.freq_base", 10000.0)), rope_scaling=scaling,
                           tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors), **extra)
    except ConfigError as e:
        raise GGUFError(f"{path}: {e}") from None


def _unpermute(w_OI: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (each head's rotary pairs interleaved) back to split halves."""
    half = w_OI.shape[0] // n_heads // 2
    return w_OI.reshape(n_heads, half, 2, *w_OI.shape[1:]).swapaxes(1, 2).reshape(w_OI.shape)


def read_gguf(path: str | Path, dtype=np.float32) -> tuple[ModelConfig, dict, dict[str, bytes]]:
    """(ModelConfig, params, tokenizer files) from a GGUF file: the tensors dequantized and cast to `dtype`, and
    tokenizer.json / tokenizer_config.json (special tokens, add_bos_token, the chat template) built from its
    `tokenizer.*` metadata."""
    from llama_jax.text.tokenizer_build import from_gguf_vocabulary

    path = Path(path)
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    tokenizer = from_gguf_vocabulary(metadata(reader, "tokenizer."), str(path))
    # where each tensor's bytes are, its type, and its shape in numpy order (GGUF lists the fastest dimension first)
    tensors = {t.name: (int(t.data_offset), int(t.n_bytes), t.tensor_type, tuple(int(n) for n in t.shape[::-1]))
               for t in reader.tensors}
    del reader  # and its memory map: each tensor is read from the file when its turn comes
    return config, _params(config, tensors, path, dtype), tokenizer


def load_gguf(path: str | Path, dtype=np.float32) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from a GGUF file (see read_gguf)."""
    config, params, _ = read_gguf(path, dtype)
    return config, params


def _dequantize_into(out_RC: np.ndarray, data, qtype, rows_per_chunk: int = 2048) -> None:
    """The tensor's [rows, columns] float values into `out_RC` (any dtype, a view may be transposed)."""
    import gguf

    for i in range(0, out_RC.shape[0], rows_per_chunk):
        out_RC[i:i + rows_per_chunk] = gguf.quants.dequantize(data[i:i + rows_per_chunk], qtype)


def _params(config: ModelConfig, tensors: dict, path: Path, dtype) -> dict:
    import gguf
    import jax

    from llama_jax.model import param_shapes

    def read_into(name: str, ours: str, out: np.ndarray) -> None:
        """Tensor `name` in our layout into `out` ([in, out] for matrices: the file's [out, in] transposed)."""
        if name not in tensors:
            raise GGUFError(f"{path}: tensor {name} is missing")
        offset, size, qtype, shape = tensors[name]
        if qtype.name not in _DEQUANTIZABLE:
            raise GGUFError(f"{path}: tensor {name} has type {qtype.name}, which cannot be dequantized "
                            f"(supported: {', '.join(_DEQUANTIZABLE)})")
        expected = out.shape[::-1] if ours in _MATRICES else out.shape
        if shape != expected:
            raise GGUFError(f"{path}: tensor {name} has shape {shape}, expected {expected}")
        raw = np.fromfile(path, np.uint8, count=size, offset=offset)
        if raw.size != size:
            raise GGUFError(f"{path}: tensor {name} is cut short (the file is truncated)")
        element = {"F32": np.float32, "F16": np.float16}.get(qtype.name)
        # the gguf package's layout: float arrays in the tensor's shape, else rows of bytes
        data = raw.view(element).reshape(shape) if element else raw.reshape(int(np.prod(shape[:-1])), -1)
        if ours in ("wq", "wk"):  # small: whole, so that the row permutation can be undone
            w = gguf.quants.dequantize(data, qtype)
            out[...] = _unpermute(w, config.n_heads if ours == "wq" else config.n_kv_heads).T
        elif out.ndim == 2:  # the file's rows are our columns for [in, out] matrices; the embedding is [V, D] in both
            _dequantize_into(out.T if ours in _MATRICES else out, data, qtype)
        else:  # a norm's weights
            out[...] = gguf.quants.dequantize(data, qtype).reshape(out.shape)

    expected = param_shapes(config)
    params = {"layers": {}}
    for ours, name in _TOP_NAMES.items():
        if ours == "lm_head" and config.tie_embeddings:
            continue
        host = aligned_empty(expected[ours].shape, dtype)
        read_into(name, ours, host)
        params[ours] = jax.device_put(host)  # on a CPU: the same memory, not a copy
    for ours, pattern in _LAYER_NAMES.items():
        stacked = aligned_empty(expected["layers"][ours].shape, dtype)
        for i in range(config.n_layers):
            read_into(pattern.format(i), ours, stacked[i])
        params["layers"][ours] = jax.device_put(stacked)
    return params
