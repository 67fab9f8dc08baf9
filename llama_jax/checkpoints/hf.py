"""Hugging Face Llama checkpoints <-> our parameter pytree.

HF stores torch Linear weights as [out, in]; ours are [in, out], so every matrix is transposed. Both use the
split-halves RoPE layout (HF's converter already permuted Meta's interleaved q/k weights), so q/k need no
permutation. Layers are stacked on a leading axis one parameter kind at a time, so host memory holds the
finished arrays plus a single kind's buffer, never the checkpoint twice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import ConfigError, ModelConfig
from llama_jax.errors import UserError
from llama_jax.files import apply_umask, make_dirs
from llama_jax.host_memory import aligned_empty

# ours -> HF name (per layer names take the layer index), and whether the tensor is a transposed matrix.
_LAYER_NAMES = {
    "attn_norm": ("model.layers.{}.input_layernorm.weight", False),
    "wq": ("model.layers.{}.self_attn.q_proj.weight", True),
    "wk": ("model.layers.{}.self_attn.k_proj.weight", True),
    "wv": ("model.layers.{}.self_attn.v_proj.weight", True),
    "wo": ("model.layers.{}.self_attn.o_proj.weight", True),
    "ffn_norm": ("model.layers.{}.post_attention_layernorm.weight", False),
    "w_gate": ("model.layers.{}.mlp.gate_proj.weight", True),
    "w_up": ("model.layers.{}.mlp.up_proj.weight", True),
    "w_down": ("model.layers.{}.mlp.down_proj.weight", True),
}
_TOP_NAMES = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}
SUPPORTED_ROPE = ("default", "linear", "llama3")


class CheckpointError(ValueError, UserError):
    """A checkpoint directory we cannot read; the message is one line naming the file and the problem."""


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    archs = hf.get("architectures") or []
    is_mistral = hf.get("model_type") == "mistral" or "MistralForCausalLM" in archs
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in archs and not is_mistral:
        raise CheckpointError(f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; "
                              "supported: LlamaForCausalLM (model_type llama) and MistralForCausalLM without a "
                              "sliding window shorter than the context")
    window, context = hf.get("sliding_window"), hf.get("max_position_embeddings", 2048)
    if is_mistral and window is not None and window < context:
        raise CheckpointError(f"{source}: sliding_window={window} is shorter than the context "
                              f"max_position_embeddings={context}; sliding-window attention is not supported "
                              "(a Mistral model without it, or with a window of at least the context, is)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not supported (LLaMA has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported; supported: silu")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE:
        raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_ROPE)}")
    scaling = {"default": "none"}.get(rope_type, rope_type)
    extra = {}
    if scaling != "none":
        extra["rope_factor"] = float(rope["factor"])
    if scaling == "llama3":
        extra.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                     rope_high_freq_factor=float(rope["high_freq_factor"]),
                     rope_original_max_positions=int(rope["original_max_position_embeddings"]))
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=hf.get("head_dim"),
            ffn_dim=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta), rope_scaling=scaling, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **extra)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(config: ModelConfig) -> dict:
    rope = None
    if config.rope_scaling == "linear":
        rope = {"rope_type": "linear", "factor": config.rope_factor}
    elif config.rope_scaling == "llama3":
        rope = {"rope_type": "llama3", "factor": config.rope_factor,
                "low_freq_factor": config.rope_low_freq_factor, "high_freq_factor": config.rope_high_freq_factor,
                "original_max_position_embeddings": config.rope_original_max_positions}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.dim, "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "intermediate_size": config.ffn_dim, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": rope, "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
    }


def _tensor_files(path: Path) -> dict[str, Path]:
    """Maps every tensor name to the safetensors file that holds it."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index}: not a safetensors index (expected a 'weight_map')") from None
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              "(only safetensors checkpoints are supported)")
    try:
        with safe_open(single, framework="np") as f:
            return {name: single for name in f.keys()}
    except Exception as e:  # safetensors' SafetensorError for a truncated or garbled header
        raise CheckpointError(f"{single}: unreadable safetensors file ({str(e).strip()[:200]})") from None


def load_hf_checkpoint(path, dtype=jnp.float32):
    """Reads a Hugging Face Llama directory (config.json + model.safetensors or a sharded index) into
    (ModelConfig, params). Parameters are cast to `dtype` (float32 master weights by default)."""
    from safetensors import safe_open

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face Llama checkpoint directory)")
    try:
        hf = json.loads(config_file.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    try:
        config = config_from_hf(hf, str(config_file))
    except KeyError as e:
        raise CheckpointError(f"{config_file}: missing key {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{config_file}: a value has the wrong type ({e})") from None
    files = _tensor_files(path)
    handles = {}

    def read(name: str, transpose: bool, shape: tuple) -> np.ndarray:
        if name not in files:
            raise CheckpointError(f"{path}: tensor {name} is missing from the checkpoint")
        file = files[name]
        try:
            if file not in handles:
                handles[file] = safe_open(file, framework="np")
            tensor = handles[file].get_tensor(name)
        except FileNotFoundError:
            raise CheckpointError(f"{file}: no such file (named by the checkpoint's index)") from None
        except Exception as e:  # safetensors' SafetensorError for a truncated or garbled file
            raise CheckpointError(f"{file}: unreadable safetensors file ({str(e).strip()[:200]})") from None
        tensor = tensor.T if transpose else tensor
        if tensor.shape != shape:
            raise CheckpointError(f"{file.name}: tensor {name} has shape {tensor.shape}, expected {shape}")
        return tensor

    from llama_jax.model import param_shapes

    expected = param_shapes(config)
    params = {"layers": {}}
    for ours, (name, transpose) in _TOP_NAMES.items():
        if ours == "lm_head" and config.tie_embeddings:
            continue
        params[ours] = jnp.asarray(read(name, transpose, expected[ours].shape), dtype)
    for ours, (pattern, transpose) in _LAYER_NAMES.items():
        shape = expected["layers"][ours].shape
        stacked = aligned_empty(shape, dtype)
        for i in range(config.n_layers):
            stacked[i] = read(pattern.format(i), transpose, shape[1:])
        params["layers"][ours] = jax.device_put(stacked)  # on a CPU: the same memory, not a copy
    return config, params


def hf_state_dict(config: ModelConfig, params) -> dict[str, np.ndarray]:
    """Our pytree as HF tensor names -> float32 [out, in] numpy arrays."""
    out = {}
    for ours, (name, transpose) in _TOP_NAMES.items():
        if ours == "lm_head" and config.tie_embeddings:
            continue
        w = np.asarray(params[ours], np.float32)
        out[name] = np.ascontiguousarray(w.T if transpose else w)
    for ours, (pattern, transpose) in _LAYER_NAMES.items():
        stacked = np.asarray(params["layers"][ours], np.float32)
        for i in range(config.n_layers):
            out[pattern.format(i)] = np.ascontiguousarray(stacked[i].T if transpose else stacked[i])
    return out


def save_hf_checkpoint(out_dir, config: ModelConfig, params, tokenizer=None, max_shard_bytes: int = 2 << 30,
                       chat_template: str | None = None, stop_tokens=()):
    """Writes config.json and float32 safetensors (sharded with an index above `max_shard_bytes`), loadable by
    transformers.LlamaForCausalLM.from_pretrained. With a SentencePiece tokenizer (or a path to one) it also writes
    what AutoTokenizer needs to behave as the project does: tokenizer.model and tokenizer_config.json (BOS added,
    the special tokens, the chat template), and generation_config.json listing the stop tokens."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    make_dirs(out, "--out")
    tensors = hf_state_dict(config, params)
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    shards.append(current)
    def write(shard, name):
        save_file(shard, out / name, metadata={"format": "pt"})
        apply_umask(out / name)  # safetensors creates its files 0600

    if len(shards) == 1:
        write(shards[0], "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write(shard, fname)
            weight_map.update({name: fname for name in shard})
        total = sum(t.nbytes for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_config = config_to_hf(config)
    if tokenizer is not None:
        from llama_jax.text.tokenizer import HFTokenizer, load_tokenizer
        from llama_jax.text.tokenizer_json import ConversionError, sentencepiece_to_json

        tok = tokenizer if hasattr(tokenizer, "model_bytes") else load_tokenizer(tokenizer)
        tok.save(out)
        hf_config.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        if not isinstance(tok, HFTokenizer):  # a tokenizers checkpoint brings its own tokenizer_config.json
            (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok, config, chat_template),
                                                                  indent=2))
            try:  # the same ids for tools that read only tokenizer.json
                (out / "tokenizer.json").write_text(sentencepiece_to_json(tok.model_bytes), encoding="utf-8")
            except ConversionError as e:
                print(f"note: no tokenizer.json written: {e}", file=sys.stderr)
        eos = list(dict.fromkeys([tok.eos_id, *stop_tokens]))
        (out / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": tok.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    return out


def tokenizer_config(tok, config: ModelConfig, chat_template: str | None) -> dict:
    """tokenizer_config.json for a SentencePiece tokenizer, so that AutoTokenizer adds BOS as generate.py does
    and keeps the model's own treatment of a leading space (tokenizers trained here add no dummy prefix)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.model_bytes)
    piece = lambda i: tok.piece(i) if i is not None and i >= 0 else None
    out = {"tokenizer_class": "LlamaTokenizer", "bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id),
           "unk_token": piece(tok.unk_id), "pad_token": piece(tok.pad_id), "add_bos_token": True,
           "add_eos_token": False, "add_prefix_space": bool(proto.normalizer_spec.add_dummy_prefix),
           "legacy": False, "model_max_length": config.max_seq_len}
    if chat_template:
        out["chat_template"] = chat_template
    return {k: v for k, v in out.items() if v is not None}
