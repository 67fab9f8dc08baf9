"""Pretraining (and fine-tuning): loss, optimizer, the jitted step, evaluation and the loop.

The step is one pure function `(state, batch) -> (state, metrics)` with the state donated; sharding is declared
at the jit boundary only. See `run()` for the loop: data, checkpoints, signals, logging.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from llama_jax import model
from llama_jax.config import ModelConfig, TrainConfig
from llama_jax.matmul import matmul

DECAYED = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 [2] raw key data: the run's randomness (kept for extensions such as dropout)


# ---------------------------------------------------------------------------------------------------------------
# Loss.


def cross_entropy(h_NTD, w, targets_NT, mask_NT, chunk: int, transposed: bool = False):
    """Sums over unmasked tokens of (next-token cross-entropy, log-normaliser squared), in float32. The head w is
    [D, V], or with transposed=True a [V, D] matrix read transposed (tied embeddings, as model.lm_head).

    Tokens are processed `chunk` at a time under jax.checkpoint, so at most chunk x V logits exist at once, in
    the forward pass and the backward pass alike; the log-softmax is never materialised (logsumexp - target)."""
    D = h_NTD.shape[-1]
    h_ND, t_N, m_N = h_NTD.reshape(-1, D), targets_NT.reshape(-1), mask_NT.reshape(-1).astype(jnp.float32)

    def chunk_loss(h_CD, t_C, m_C):
        logits_CV = model.lm_head(h_CD, w, transposed)
        lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
        target_C = jnp.take_along_axis(logits_CV, t_C[:, None], axis=-1)[:, 0]
        return jnp.sum((lse_C - target_C) * m_C), jnp.sum(lse_C * lse_C * m_C)

    n = h_ND.shape[0]
    if n <= chunk:
        return chunk_loss(h_ND, t_N, m_N)
    pad = -n % chunk
    h_KCD = jnp.pad(h_ND, ((0, pad), (0, 0))).reshape(-1, chunk, D)
    t_KC = jnp.pad(t_N, (0, pad)).reshape(-1, chunk)
    m_KC = jnp.pad(m_N, (0, pad)).reshape(-1, chunk)
    ce_K, z_K = jax.lax.map(lambda args: jax.checkpoint(chunk_loss)(*args), (h_KCD, t_KC, m_KC))
    return ce_K.sum(), z_K.sum()


def loss_sums(params, batch, config: ModelConfig, train: TrainConfig):
    """(objective summed over tokens, (ce sum, z sum, token count)) for one (micro-)batch. A batch without
    "segment_ids" is plain causal (one document per row), which fused attention kernels handle fastest."""
    h = model.hidden_states(params, batch["tokens"], config, batch["positions"], batch.get("segment_ids"))
    w, transposed = model.head_matrix(params)
    ce, z = cross_entropy(h, w.astype(h.dtype), batch["targets"], batch["loss_mask"], train.loss_chunk, transposed)
    return ce + train.z_loss * z, (ce, z, jnp.sum(batch["loss_mask"]))


# ---------------------------------------------------------------------------------------------------------------
# Optimizer.


def lr_schedule(train: TrainConfig) -> optax.Schedule:
    peak, floor, warm = train.lr, train.lr * train.min_lr_ratio, train.warmup_steps
    warmup = optax.linear_schedule(0.0, peak, max(warm, 1))
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
    """True for the weight matrices AdamW decays: projections and the LM head (and the embedding if asked)."""
    flat = traverse_util.flatten_dict(params)
    keep = DECAYED + (("embed",) if decay_embeddings else ())
    return traverse_util.unflatten_dict({path: path[-1] in keep for path in flat})


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(train), b1=train.beta1, b2=train.beta2, eps=train.eps,
                        weight_decay=train.weight_decay,
                        mask=functools.partial(decay_mask, decay_embeddings=train.decay_embeddings))
    # The same chain with clipping on or off, so that a run resumed with another grad_clip restores its state.
    clip = optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)


def init_state(config: ModelConfig, train: TrainConfig, key, params=None) -> TrainState:
    params = model.init_params(config, key) if params is None else params
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=make_optimizer(train).init(params),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)))


# ---------------------------------------------------------------------------------------------------------------
# Steps.


def accumulate_gradients(params, batch, config: ModelConfig, train: TrainConfig):
    """(gradients of the summed objective, (ce sum, z sum, token count)) over `batch` (arrays [B, T]) split into
    train.grad_accum micro-batches: the same sums as one big batch, up to the order of the additions."""
    grad_fn = jax.grad(loss_sums, has_aux=True)
    k = train.grad_accum
    if k == 1:
        return grad_fn(params, batch, config, train)
    micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)

    def body(carry, mb):
        g, sums = grad_fn(params, mb, config, train)
        return jax.tree.map(jnp.add, carry, (g, sums)), None

    zeros = (jax.tree.map(jnp.zeros_like, params), (0.0, 0.0, 0.0))
    return jax.lax.scan(body, zeros, micro)[0]


def train_step(state: TrainState, batch, config: ModelConfig, train: TrainConfig):
    """One optimizer step over `batch` (arrays [B, T]) split into train.grad_accum micro-batches. The loss is the
    mean over all unmasked tokens of the whole batch, so k micro-batches equal one big batch."""
    grads, (ce, z, count) = accumulate_gradients(state.params, batch, config, train)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = make_optimizer(train).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": ce / count, "z_loss": z / count, "grad_norm": optax.global_norm(grads),
               "lr": lr_schedule(train)(state.step), "tokens": count}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, config: ModelConfig, train: TrainConfig):
    _, (ce, _, count) = loss_sums(params, batch, config, train)
    return ce, count


def jit_steps(config: ModelConfig, train: TrainConfig, state_shardings=None, batch_sharding=None):
    """(train_step, eval_step) jitted with shardings at the boundary and the train state donated."""
    replicated = None if batch_sharding is None else jax.sharding.NamedSharding(batch_sharding.mesh,
                                                                                 jax.sharding.PartitionSpec())
    step = jax.jit(functools.partial(train_step, config=config, train=train), donate_argnums=0,
                   in_shardings=None if state_shardings is None else (state_shardings, batch_sharding),
                   out_shardings=None if state_shardings is None else (state_shardings, replicated))
    evaluate = jax.jit(functools.partial(eval_step, config=config, train=train),
                       in_shardings=None if state_shardings is None else (state_shardings.params, batch_sharding))
    return step, evaluate


def measure_peak_flops(dtype: str = "float32", n: int = 2048) -> float:
    """FLOP/s of a large square matmul on the default device: the denominator of MFU on machines without a
    published peak (CPUs). Best of a few runs."""
    import time

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: matmul(a, a, out_dtype=jnp.float32))  # the model's products (16-bit accumulate in f32)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
