"""The training step: the loss (chunked cross-entropy over the LM head), gradients accumulated over micro-batches,
the optimizer update, and the evaluation step.

The step is one pure function `(state, batch) -> (state, metrics)` with the state donated; sharding is declared
at the jit boundary only. The optimizer and the train state are optim.py's; the run around the step is loop.py's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from llama_jax import model
from llama_jax.config import ModelConfig, TrainConfig
from llama_jax.optim import TrainState, lr_schedule, make_optimizer

# ---------------------------------------------------------------------------------------------------------------
# Loss.


def cross_entropy(h_BTD, w, targets_BT, mask_BT, chunk: int, transposed: bool = False):
    """Sums over unmasked tokens of (next-token cross-entropy, log-normaliser squared), in float32. The head w is
    [D, V], or with transposed=True a [V, D] matrix read transposed (tied embeddings, as model.lm_head).

    Tokens are processed `chunk` at a time under jax.checkpoint, so at most chunk x V logits exist at once, in
    the forward pass and the backward pass alike; the log-softmax is never materialised (logsumexp - target)."""
    D = h_BTD.shape[-1]
    h_RD, t_R, m_R = h_BTD.reshape(-1, D), targets_BT.reshape(-1), mask_BT.reshape(-1).astype(jnp.float32)

    def chunk_loss(h_CD, t_C, m_C):
        logits_CV = model.lm_head(h_CD, w, transposed)
        lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
        target_C = jnp.take_along_axis(logits_CV, t_C[:, None], axis=-1)[:, 0]
        return jnp.sum((lse_C - target_C) * m_C), jnp.sum(lse_C * lse_C * m_C)

    n = h_RD.shape[0]
    if n <= chunk:
        return chunk_loss(h_RD, t_R, m_R)
    pad = -n % chunk
    h_JCD = jnp.pad(h_RD, ((0, pad), (0, 0))).reshape(-1, chunk, D)
    t_JC = jnp.pad(t_R, (0, pad)).reshape(-1, chunk)
    m_JC = jnp.pad(m_R, (0, pad)).reshape(-1, chunk)
    ce_J, z_J = jax.lax.map(lambda args: jax.checkpoint(chunk_loss)(*args), (h_JCD, t_JC, m_JC))
    return ce_J.sum(), z_J.sum()


def loss_sums(params, batch, config: ModelConfig, train: TrainConfig):
    """(objective summed over tokens, (ce sum, z sum, token count)) for one (micro-)batch. A batch without
    "segment_ids" is plain causal (one document per row), which fused attention kernels handle fastest."""
    h = model.hidden_states(params, batch["tokens"], config, batch["positions"], batch.get("segment_ids"))
    w, transposed = model.head_matrix(params)
    ce, z = cross_entropy(h, w.astype(h.dtype), batch["targets"], batch["loss_mask"], train.loss_chunk, transposed)
    return ce + train.z_loss * z, (ce, z, jnp.sum(batch["loss_mask"]))


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
