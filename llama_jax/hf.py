"""Hugging Face Llama checkpoints <-> our parameter pytree.

HF stores torch Linear weights as [out, in]; ours are [in, out], so every matrix is transposed. Both use the
split-halves RoPE layout (HF's converter already permuted Meta's interleaved q/k weights), so q/k need no
permutation. Layers are stacked on a leading axis one parameter kind at a time, so host memory holds the
finished arrays plus a single kind's buffer, never the checkpoint twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import ConfigError, ModelConfig

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


class CheckpointError(ValueError):
    """A checkpoint directory we cannot read; the message is one line naming the file and the problem."""


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise CheckpointError(f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; "
                              "supported: LlamaForCausalLM (model_type llama)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not supported (LLaMA has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported; supported: silu")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // n_heads):
        raise CheckpointError(f"{source}: head_dim={hf['head_dim']} != hidden_size/num_attention_heads; "
                              "only head_dim = hidden_size / num_attention_heads is supported")
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
            n_kv_heads=hf.get("num_key_value_heads") or n_heads, ffn_dim=hf["intermediate_size"],
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
    with safe_open(single, framework="np") as f:
        return {name: single for name in f.keys()}


def load_hf_checkpoint(path, dtype=jnp.float32):
    """Reads a Hugging Face Llama directory (config.json + model.safetensors or a sharded index) into
    (ModelConfig, params). Parameters are cast to `dtype` (float32 master weights by default)."""
    from safetensors import safe_open

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face Llama checkpoint directory)")
    try:
        config = config_from_hf(json.loads(config_file.read_text()), str(config_file))
    except KeyError as e:
        raise CheckpointError(f"{config_file}: missing key {e.args[0]}") from None
    files = _tensor_files(path)
    handles = {}

    def read(name: str, transpose: bool, shape: tuple) -> np.ndarray:
        if name not in files:
            raise CheckpointError(f"{path}: tensor {name} is missing from the checkpoint")
        file = files[name]
        if file not in handles:
            handles[file] = safe_open(file, framework="np")
        tensor = handles[file].get_tensor(name)
        tensor = tensor.T if transpose else tensor
        if tensor.shape != shape:
            raise CheckpointError(f"{file.name}: tensor {name} has shape {tensor.shape}, expected {shape}")
        return tensor

    expected = jax.eval_shape(lambda: _param_shapes(config))
    params = {"layers": {}}
    for ours, (name, transpose) in _TOP_NAMES.items():
        if ours == "lm_head" and config.tie_embeddings:
            continue
        params[ours] = jnp.asarray(read(name, transpose, expected[ours].shape), dtype)
    for ours, (pattern, transpose) in _LAYER_NAMES.items():
        shape = expected["layers"][ours].shape
        stacked = np.empty(shape, dtype)
        for i in range(config.n_layers):
            stacked[i] = read(pattern.format(i), transpose, shape[1:])
        params["layers"][ours] = jnp.asarray(stacked)
        del stacked
    return config, params


def _param_shapes(config):
    from llama_jax.model import init_params

    return init_params(config, jax.random.key(0))


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


def save_hf_checkpoint(out_dir, config: ModelConfig, params, tokenizer=None, max_shard_bytes: int = 2 << 30):
    """Writes config.json and float32 safetensors (sharded with an index above `max_shard_bytes`), plus the
    SentencePiece tokenizer.model when a tokenizer (or a path to one) is given, loadable by
    transformers.LlamaForCausalLM.from_pretrained."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(config, params)
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        if current and size + t.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / fname, metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.nbytes for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_config = config_to_hf(config)
    if tokenizer is not None:
        model_file = Path(getattr(tokenizer, "model_file", tokenizer))
        (out / "tokenizer.model").write_bytes(model_file.read_bytes())
        if hasattr(tokenizer, "bos_id"):
            hf_config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    return out


def main(argv=None) -> int:
    """python -m llama_jax.hf export --checkpoint RUN_DIR --out HF_DIR
    python -m llama_jax.hf import --checkpoint HF_DIR --out RUN_DIR"""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m llama_jax.hf", description="Convert to and from Hugging Face Llama.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="a training run's checkpoint -> a Hugging Face Llama directory")
    e.add_argument("--checkpoint", required=True, help="training run directory")
    e.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    e.add_argument("--out", required=True)
    e.add_argument("--max-shard-gb", type=float, default=2.0)
    i = sub.add_parser("import", help="a Hugging Face Llama directory -> a run directory (Orbax checkpoint)")
    i.add_argument("--checkpoint", required=True, help="Hugging Face Llama directory")
    i.add_argument("--out", required=True, help="run directory to create")
    args = p.parse_args(argv)

    from llama_jax.checkpoint import ResumeError
    from llama_jax.loop import load_run_params, save_imported
    from llama_jax.tokenizer import Tokenizer, TokenizerError

    try:
        if args.command == "export":
            config, params, _ = load_run_params(args.checkpoint, args.step)
            tok = Path(args.checkpoint) / "tokenizer.model"
            out = save_hf_checkpoint(args.out, config, params, Tokenizer(tok) if tok.is_file() else None,
                                     int(args.max_shard_gb * (1 << 30)))
        else:
            config, params = load_hf_checkpoint(args.checkpoint)
            tok = Path(args.checkpoint) / "tokenizer.model"
            if not tok.is_file():
                raise CheckpointError(f"{args.checkpoint}: no tokenizer.model (a SentencePiece model is required)")
            out = save_imported(args.out, config, params, Tokenizer(tok))
    except (CheckpointError, ResumeError, TokenizerError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
