"""The optimizer side of training: the train state, learning-rate schedules, AdamW with its weight-decay mask,
and gradient clipping. Shared by the train step (train/step.py) and the run directory's checkpoints."""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from llama_jax import model
from llama_jax.config import LoraConfig, ModelConfig, TrainConfig
from llama_jax.lora import init_adapters

DECAYED = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 [2] raw key data: the run's randomness (kept for extensions such as dropout)



def lr_schedule(train: TrainConfig) -> optax.Schedule:
    peak, floor, warm = train.lr, train.lr * train.min_lr_ratio, train.warmup_steps
    # Step s of the warm-up (0-based) takes peak * (s + 1) / warm: the first step already learns, the last of them
    # reaches the peak (a warm-up from 0 spent its first step on nothing).
    warmup = optax.linear_schedule(peak / max(warm, 1), peak, max(warm - 1, 1))
    if train.schedule == "constant":
        rest = optax.constant_schedule(peak)
    elif train.schedule == "cosine":
        rest = optax.cosine_decay_schedule(peak, max(train.steps - warm, 1), alpha=train.min_lr_ratio)
    else:  # wsd: hold the peak, then decay linearly to the floor over the last decay_fraction of training
        decay = max(int(train.steps * train.decay_fraction), 1)
        stable = max(train.steps - warm - decay, 0)
        rest = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
                                    [stable])
    return optax.join_schedules([warmup, rest], [warm]) if warm else rest


def decay_mask(params, decay_embeddings: bool = False):
    """True for the weight matrices AdamW decays: projections and the LM head (and the embedding if asked); for
    LoRA adapters ({"wq": {"a", "b"}, ...}), those of the projections."""
    flat = traverse_util.flatten_dict(params)
    keep = DECAYED + (("embed",) if decay_embeddings else ())
    return traverse_util.unflatten_dict({path: any(name in keep for name in path) for path in flat})


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(train), b1=train.beta1, b2=train.beta2, eps=train.eps,
                        weight_decay=train.weight_decay,
                        mask=functools.partial(decay_mask, decay_embeddings=train.decay_embeddings))
    # The same chain with clipping on or off, so that a run resumed with another grad_clip restores its state.
    clip = optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)


def init_state(config: ModelConfig, train: TrainConfig, key, params=None, lora: LoraConfig | None = None
               ) -> TrainState:
    """The state of a run at step 0: `params` (default: freshly initialised) and their optimizer state; with
    lora.rank > 0 the trained parameters are new LoRA adapters instead (lora.py; the base stays outside)."""
    if lora is not None and lora.rank:
        params = init_adapters(config, lora, jax.random.fold_in(key, 2))
    params = model.init_params(config, key) if params is None else params
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=make_optimizer(train).init(params),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)))
