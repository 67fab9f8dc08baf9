"""GGUF files (llama.cpp, Ollama, LM Studio: one file with the weights, often quantized, and the tokenizer, chat
template and special tokens in its metadata) -> config, parameter pytree, tokenizer files.

Reading and dequantizing are the `gguf` package's (llama.cpp's own Python reader): F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1 and the K-quants. The file is memory-mapped; each tensor is dequantized to float32 and written
into its layer's slot of the stacked array in the requested dtype, so loading holds the pytree plus one tensor.

llama.cpp stores q and k rows permuted for its interleaved RoPE; they are permuted back exactly as transformers'
GGUF reader does, into the split-halves layout model.py uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llama_jax.config import ConfigError, ModelConfig
from llama_jax.errors import UserError

ARCHITECTURES = ("llama", "mistral")  # the same tensors; mistral without a short sliding window
# ours -> (GGUF name, per layer), all [out, in] in the file except the norms
_LAYER_NAMES = {"attn_norm": "blk.{}.attn_norm.weight", "wq": "blk.{}.attn_q.weight", "wk": "blk.{}.attn_k.weight",
                "wv": "blk.{}.attn_v.weight", "wo": "blk.{}.attn_output.weight", "ffn_norm": "blk.{}.ffn_norm.weight",
                "w_gate": "blk.{}.ffn_gate.weight", "w_up": "blk.{}.ffn_up.weight", "w_down": "blk.{}.ffn_down.weight"}
_TOP_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head")


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


def load_gguf(path: str | Path, dtype=np.float32) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from a GGUF file, the tensors dequantized and cast to `dtype`."""
    import gguf
    import jax.numpy as jnp

    from llama_jax.model import param_shapes

    path = Path(path)
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    tensors = {t.name: t for t in reader.tensors}

    def read(name: str, ours: str, shape: tuple) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise GGUFError(f"{path}: tensor {name} is missing")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GGUFError(f"{path}: tensor {name} has type {t.tensor_type.name}, which cannot be dequantized "
                            "(supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K .. Q6_K)") from None
        if ours in ("wq", "wk"):
            w = _unpermute(w.reshape(-1, w.shape[-1]), config.n_heads if ours == "wq" else config.n_kv_heads)
        w = w.T if ours in _MATRICES else w
        if w.shape != shape:
            raise GGUFError(f"{path}: tensor {name} has shape {w.shape[::-1] if ours in _MATRICES else w.shape}, "
                            f"expected {shape[::-1] if ours in _MATRICES else shape}")
        return w

    expected = param_shapes(config)
    params = {"layers": {}}
    for ours, name in _TOP_NAMES.items():
        if ours == "lm_head" and config.tie_embeddings:
            continue
        params[ours] = jnp.asarray(read(name, ours, expected[ours].shape), dtype)
    for ours, pattern in _LAYER_NAMES.items():
        shape = expected["layers"][ours].shape
        stacked = np.empty(shape, dtype)
        for i in range(config.n_layers):
            stacked[i] = read(pattern.format(i), ours, shape[1:])
        params["layers"][ours] = jnp.asarray(stacked)
        del stacked
    return config, params


def tokenizer_files(path: str | Path) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json (special tokens, add_bos_token, the chat template) built from the
    file's `tokenizer.*` metadata."""
    from llama_jax.text.tokenizer_build import from_gguf_vocabulary

    return from_gguf_vocabulary(metadata(open_gguf(path), "tokenizer."), str(path))
