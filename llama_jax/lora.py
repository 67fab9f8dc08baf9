"""Low-rank adapters (LoRA): a second pytree beside the parameters, never inside them.

    adapters = {"wq": {"a": [L, in, r], "b": [L, r, out]}, "w_down": {...}, ...}

one entry per adapted projection (any of config.LORA_TARGETS), stacked on the layer axis like the weights they
adapt. A projection x @ W becomes x @ W + scale * (x @ a) @ b with scale = alpha / r (rsLoRA: alpha / sqrt(r)).
`a` starts random and `b` at zero, so a new adapter changes nothing. Training differentiates the adapters only
(the base is an argument of the step, never updated); `merge` folds them into plain parameters for generation and
serving, at no cost per token. PEFT's files hold the same numbers transposed, per layer (checkpoints/peft.py).
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import model
from llama_jax.config import LoraConfig, ModelConfig
from llama_jax.errors import ArgumentError


def adapter_shapes(config: ModelConfig, lora: LoraConfig) -> dict:
    """{target: {"a": (L, in, r), "b": (L, r, out)}} for the targets lora names."""
    shapes = {t: x.shape for t, x in model.param_shapes(config)["layers"].items()}
    return {t: {"a": (shapes[t][0], shapes[t][1], lora.rank), "b": (shapes[t][0], lora.rank, shapes[t][2])}
            for t in lora.target_names}


def init_adapters(config: ModelConfig, lora: LoraConfig, key) -> dict:
    """New float32 adapters: `a` uniform in +-1/sqrt(in) (PEFT's default, Kaiming-uniform with a = sqrt(5)) and `b`
    zero, so that the adapted model starts equal to its base."""
    if lora.rank < 1:
        raise ArgumentError(f"init_adapters needs lora.rank >= 1, got {lora.rank}", "lora.rank")
    out = {}
    for i, (t, s) in enumerate(adapter_shapes(config, lora).items()):
        bound = 1.0 / np.sqrt(s["a"][1])
        out[t] = {"a": jax.random.uniform(jax.random.fold_in(key, i), s["a"], jnp.float32, -bound, bound),
                  "b": jnp.zeros(s["b"], jnp.float32)}
    return out


def check_adapters(adapters, config: ModelConfig, lora: LoraConfig) -> None:
    """One line if `adapters` do not have the shapes `lora` gives for this model."""
    want = adapter_shapes(config, lora)
    got = {t: {k: tuple(v.shape) for k, v in ab.items()} for t, ab in adapters.items()}
    if got != want:
        raise ArgumentError(f"adapters: expected shapes {want}, got {got}", "adapters")


def scaled(adapters, lora: LoraConfig) -> dict:
    """The adapters as model.hidden_states takes them: `b` multiplied by the scale."""
    return {t: {"a": ab["a"], "b": ab["b"] * lora.scale} for t, ab in adapters.items()}


def merge_adapters(params, adapters, lora: LoraConfig) -> dict:
    """Plain parameters with every adapted weight replaced by W + scale * a @ b (computed in float32, stored in
    W's dtype): what generation and serving run, at no extra cost per token."""
    layers = dict(params["layers"])
    for t, ab in adapters.items():
        w = layers[t]
        delta = jnp.einsum("lir,lro->lio", ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        layers[t] = (w.astype(jnp.float32) + lora.scale * delta).astype(w.dtype)
    return {**params, "layers": layers}


def fingerprint(params) -> str:
    """A digest of the base parameters' shapes, dtypes and bytes: a LoRA run records it and refuses another base."""
    digest = hashlib.blake2b(digest_size=16)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
