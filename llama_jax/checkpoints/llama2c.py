"""llama2.c checkpoints (`.bin`, as Karpathy's llama2.c exports them) -> our parameter pytree.

Two float32 layouts exist (llama2.c's export.py):
  legacy      7 int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative when the classifier
              is not shared with the embedding), seq_len; then token embedding, per-kind layer weights (attention
              norm, wq, wk, wv, wo, ffn norm, w1, w2, w3), final norm, the RoPE tables, the classifier if not shared.
  version 1   uint32 magic "ak42", int32 version 1, the same 7 int32 (vocab_size positive), uint8 shared
              classifier, zero padding to 256 bytes; then the attention norms, ffn norms, final norm, embedding,
              wq, wk, wv, wo, w1, w2, w3 (each for all layers) and the classifier if not shared.
Version 2 (int8 quantized) is refused. Matrices are torch Linear weights, [out, in], so every one is transposed.

llama2.c's attention rotates interleaved pairs (x[2i], x[2i+1]), Meta's RoPE layout; this project rotates split
halves (x[i], x[i + H/2]), as Hugging Face's Llama does. The rows of wq and wk are reordered per head accordingly
(even rows first, then odd rows): the same permutation Hugging Face's converter applies to Meta's weights.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from llama_jax.config import ConfigError, ModelConfig
from llama_jax.errors import UserError

MAGIC = 0x616B3432  # "ak42" read as a little-endian uint32


class Llama2cError(ValueError, UserError):
    """A file that is not a llama2.c float32 checkpoint; the message is one line naming it."""


def read_header(path: str | Path) -> tuple[ModelConfig, int, int]:
    """(config, offset of the first weight in bytes, format version: 0 legacy, 1 versioned)."""
    path = Path(path)
    head = path.read_bytes()[:256] if path.is_file() else b""
    if len(head) < 28:
        raise Llama2cError(f"{path}: too short for a llama2.c checkpoint header")
    magic, version = np.frombuffer(head[:8], "<u4")[0], int(np.frombuffer(head[4:8], "<i4")[0])
    if magic == MAGIC:
        if version != 1:
            raise Llama2cError(f"{path}: llama2.c format version {version} is not supported (only the float32 "
                               "ones: legacy and version 1; version 2 is int8-quantized)")
        if len(head) < 256:
            raise Llama2cError(f"{path}: too short for a llama2.c version 1 header")
        dims = np.frombuffer(head[8:36], "<i4").tolist()
        shared, offset = bool(head[36]), 256
    else:
        dims = np.frombuffer(head[:28], "<i4").tolist()
        shared, offset, version = dims[5] > 0, 28, 0
        dims[5] = abs(dims[5])
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = dims
    if min(dims) <= 0 or dim % max(n_heads, 1) or dim > 1 << 16 or vocab > 1 << 22 or n_layers > 1024:
        raise Llama2cError(f"{path}: not a llama2.c checkpoint (header reads dim={dim}, hidden_dim={hidden}, "
                           f"n_layers={n_layers}, n_heads={n_heads}, n_kv_heads={n_kv_heads}, vocab_size={vocab}, "
                           f"seq_len={seq_len})")
    try:
        config = ModelConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                             ffn_dim=hidden, max_seq_len=seq_len, norm_eps=1e-5, rope_theta=10000.0,
                             tie_embeddings=shared)
    except ConfigError as e:
        raise Llama2cError(f"{path}: {e}") from None
    return config, offset, version


def interleaved_to_halves(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorders the output rows of a q or k projection [n_heads * H, in] from interleaved RoPE pairs to split
    halves, per head: rows 0, 2, 4, ... then 1, 3, 5, ..."""
    out, d_in = w_out_in.shape
    H = out // n_heads
    return w_out_in.reshape(n_heads, H // 2, 2, d_in).transpose(0, 2, 1, 3).reshape(out, d_in)


def load_llama2c(path: str | Path, dtype=jnp.float32) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from a llama2.c float32 `.bin` file (legacy or version 1)."""
    path = Path(path)
    config, offset, version = read_header(path)
    D, F, L, V = config.dim, config.ffn_dim, config.n_layers, config.vocab_size
    H = config.head_dim
    NH, KH = config.n_heads * H, config.n_kv_heads * H
    shapes = {"attn_norm": (L, D), "ffn_norm": (L, D), "final_norm": (D,), "embed": (V, D),
              "wq": (L, NH, D), "wk": (L, KH, D), "wv": (L, KH, D), "wo": (L, D, NH),
              "w1": (L, F, D), "w2": (L, D, F), "w3": (L, F, D), "rope": (2, config.max_seq_len, H // 2),
              "cls": (V, D)}
    if version == 0:
        order = ["embed", "attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "final_norm", "rope"]
    else:
        order = ["attn_norm", "ffn_norm", "final_norm", "embed", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    if not config.tie_embeddings:
        order.append("cls")
    need = offset + 4 * sum(int(np.prod(shapes[k])) for k in order)
    size = path.stat().st_size
    if size < need:
        raise Llama2cError(f"{path}: {size} bytes, but its header implies {need} (a truncated file?)")
    data = np.memmap(path, dtype="<f4", mode="r", offset=offset)
    arrays, at = {}, 0
    for name in order:
        n = int(np.prod(shapes[name]))
        arrays[name] = data[at:at + n].reshape(shapes[name])
        at += n
    T = lambda a: np.swapaxes(a, -1, -2)  # [out, in] -> [in, out]
    layers = {
        "attn_norm": arrays["attn_norm"], "ffn_norm": arrays["ffn_norm"],
        "wq": T(np.stack([interleaved_to_halves(w, config.n_heads) for w in arrays["wq"]])),
        "wk": T(np.stack([interleaved_to_halves(w, config.n_kv_heads) for w in arrays["wk"]])),
        "wv": T(arrays["wv"]), "wo": T(arrays["wo"]),
        "w_gate": T(arrays["w1"]), "w_up": T(arrays["w3"]), "w_down": T(arrays["w2"]),
    }
    params = {"embed": jnp.asarray(arrays["embed"], dtype), "final_norm": jnp.asarray(arrays["final_norm"], dtype),
              "layers": {k: jnp.asarray(v, dtype) for k, v in layers.items()}}
    if not config.tie_embeddings:
        params["lm_head"] = jnp.asarray(T(arrays["cls"]), dtype)
    return config, params
