"""Hugging Face PEFT adapter directories, both ways: adapter_config.json + adapter_model.safetensors.

PEFT keeps one pair of matrices per layer and projection,
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and `...lora_B.weight` [out, r], and
computes x @ A.T @ B.T * scale: our stacked adapters (lora.py) per layer, transposed. The base's weights are in
Hugging Face's layout already (checkpoints/hf.py), so nothing is permuted. An adapter that PEFT would apply
differently from us (DoRA, trained biases, modules_to_save, per-layer ranks, Conv1D's fan_in_fan_out) is refused
in one line rather than applied wrongly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np

from llama_jax.checkpoints.hf import _LAYER_NAMES, CheckpointError
from llama_jax.config import LORA_TARGETS, ConfigError, LoraConfig, ModelConfig
from llama_jax.files import apply_umask, make_dirs, write_atomic

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# ours -> the module PEFT names in target_modules and in its keys ("model.layers.{}.self_attn.q_proj")
MODULES = {t: _LAYER_NAMES[t][0].removesuffix(".weight") for t in LORA_TARGETS}
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


def module_name(target: str) -> str:
    return MODULES[target].rsplit(".", 1)[1]  # "q_proj"


def save_peft_adapter(out_dir, adapters, lora: LoraConfig, base_name: str) -> Path:
    """Writes a PEFT LoRA adapter directory that `PeftModel.from_pretrained(base, out_dir)` loads."""
    from safetensors.numpy import save_file

    out = make_dirs(out_dir, "--out")
    tensors = {}
    for target, ab in adapters.items():
        a, b = np.asarray(jax.device_get(ab["a"]), np.float32), np.asarray(jax.device_get(ab["b"]), np.float32)
        for i in range(a.shape[0]):
            prefix = "base_model.model." + MODULES[target].format(i)
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    apply_umask(out / WEIGHTS_FILE)
    # target_modules is always a list: PEFT reads a missing one as its default for Llama (q_proj, v_proj only).
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "use_rslora": lora.rslora, "target_modules": [module_name(t) for t in LORA_TARGETS if t in adapters],
        "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_name,
    }
    write_atomic(out / CONFIG_FILE, json.dumps(config, indent=2).encode())
    return out


def load_peft_adapter(path, config: ModelConfig, flag: str = "--adapter") -> tuple[dict, LoraConfig]:
    """(adapters, LoraConfig) from a PEFT LoRA directory, checked against the base model's config; one line naming
    the file and key for anything we cannot represent or that belongs to another model."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file():
        raise ConfigError(f"{flag} {path}: no {CONFIG_FILE} (expected a PEFT LoRA adapter directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    refuse = lambda what: CheckpointError(f"{cfg_file}: {what}; only plain LoRA adapters can be applied")
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise refuse(f"peft_type is {cfg.get('peft_type') if isinstance(cfg, dict) else None!r}, not 'LORA'")
    for key, plain in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if cfg.get(key, plain) != plain:
            raise refuse(f"{key} is {cfg[key]!r}")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_pattern"):
        if cfg.get(key):
            raise refuse(f"{key} is {cfg[key]!r}")
    if not weights.is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE} (only safetensors adapters are read)")
    from safetensors.numpy import load_file

    try:
        tensors = load_file(weights)
    except Exception as e:  # safetensors' SafetensorError for a truncated or garbled file
        raise CheckpointError(f"{weights}: unreadable safetensors file ({str(e).strip()[:200]})") from None
    by_module = {module_name(t): t for t in LORA_TARGETS}
    rank = int(cfg.get("r", 8))
    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key, value in tensors.items():
        m = _KEY.fullmatch(key.replace(".default.", "."))
        if m is None or m.group(3) not in by_module:
            raise CheckpointError(f"{weights}: {key} is not a LoRA matrix of a Llama projection")
        layer, target, which = int(m.group(1)), by_module[m.group(3)], m.group(4).lower()
        if layer >= config.n_layers:
            raise CheckpointError(f"{weights}: {key} is for layer {layer}, but the base model has {config.n_layers} "
                                  "layers (an adapter for a different model)")
        found.setdefault(target, {}).setdefault(layer, {})[which] = value.astype(np.float32).T
    if not found:
        raise CheckpointError(f"{weights}: holds no LoRA matrices")
    lora = LoraConfig(rank=rank, alpha=float(cfg.get("lora_alpha", 8)), rslora=bool(cfg.get("use_rslora", False)),
                      targets=",".join(t for t in LORA_TARGETS if t in found))
    from llama_jax.lora import adapter_shapes

    adapters = {}
    for target, want in adapter_shapes(config, lora).items():
        stacked = {k: np.zeros(shape, np.float32) for k, shape in want.items()}  # a layer left out stays as it is
        for layer, pair in found[target].items():
            for k, m in pair.items():
                if m.shape != want[k][1:]:
                    hf_shape = tuple(reversed(want[k][1:]))
                    raise CheckpointError(
                        f"{weights}: {MODULES[target].format(layer)}.lora_{k.upper()}.weight has shape "
                        f"{tuple(reversed(m.shape))}, but this base model with r={rank} expects {hf_shape} "
                        "(an adapter for a different model)")
                stacked[k][layer] = m
        adapters[target] = stacked
    return adapters, lora
