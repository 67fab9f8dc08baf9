"""The training step: the loss (chunked cross-entropy over the LM head), gradients accumulated over micro-batches,
the optimizer update, and the evaluation step.

The step is one pure function `(state, batch) -> (state, metrics)` with the state donated; sharding is declared
at the jit boundary only. The optimizer and the train state are optim.py's; the run around the step is loop.py's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llama_jax import lora as lora_adapters
from llama_jax import model
from llama_jax.config import LoraConfig, ModelConfig, TrainConfig
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


def loss_sums(params, batch, config: ModelConfig, train: TrainConfig, base=None, lora: LoraConfig | None = None):
    """(objective summed over tokens, (ce sum, z sum, token count)) for one (micro-)batch. A batch without
    "segment_ids" is plain causal (one document per row), which fused attention kernels handle fastest. With
    `base`, `params` are low-rank adapters (lora.py) on those frozen parameters: only they are differentiated."""
    adapters = None
    if base is not None:
        params, adapters = base, lora_adapters.scaled(params, lora)
    h = model.hidden_states(params, batch["tokens"], config, batch["positions"], batch.get("segment_ids"), adapters)
    w, transposed = model.head_matrix(params)
    ce, z = cross_entropy(h, w.astype(h.dtype), batch["targets"], batch["loss_mask"], train.loss_chunk, transposed)
    return ce + train.z_loss * z, (ce, z, jnp.sum(batch["loss_mask"]))


# ---------------------------------------------------------------------------------------------------------------
# Steps.


def accumulate_gradients(params, batch, config: ModelConfig, train: TrainConfig, base=None,
                         lora: LoraConfig | None = None):
    """(gradients of the summed objective, (ce sum, z sum, token count)) over `batch` (arrays [B, T]) split into
    train.grad_accum micro-batches: the same sums as one big batch, up to the order of the additions. With `base`:
    the adapters' gradients (see loss_sums)."""
    grad_fn = jax.grad(loss_sums, has_aux=True)
    k = train.grad_accum
    if k == 1:
        return grad_fn(params, batch, config, train, base, lora)
    micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)

    def body(carry, mb):
        g, sums = grad_fn(params, mb, config, train, base, lora)
        return jax.tree.map(jnp.add, carry, (g, sums)), None

    zeros = (jax.tree.map(jnp.zeros_like, params), (0.0, 0.0, 0.0))
    return jax.lax.scan(body, zeros, micro)[0]


def train_step(state: TrainState, batch, config: ModelConfig, train: TrainConfig, base=None,
               lora: LoraConfig | None = None):
    """One optimizer step over `batch` (arrays [B, T]) split into train.grad_accum micro-batches. The loss is the
    mean over all unmasked tokens of the whole batch, so k micro-batches equal one big batch. With `base`,
    state.params are LoRA adapters on it (the base is read, never updated)."""
    grads, (ce, z, count) = accumulate_gradients(state.params, batch, config, train, base, lora)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = make_optimizer(train).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": ce / count, "z_loss": z / count, "grad_norm": optax.global_norm(grads),
               "lr": lr_schedule(train)(state.step), "tokens": count}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, config: ModelConfig, train: TrainConfig, base=None, lora: LoraConfig | None = None):
    _, (ce, _, count) = loss_sums(params, batch, config, train, base, lora)
    return ce, count


def jit_steps(config: ModelConfig, train: TrainConfig, state_shardings=None, batch_sharding=None,
              lora: LoraConfig | None = None, base_shardings=None):
    """(train_step, eval_step) jitted with shardings at the boundary and the train state donated. With lora.rank
    > 0 both take the frozen base as a third argument: step(state, batch, base), evaluate(adapters, batch, base)."""
    replicated = None if batch_sharding is None else jax.sharding.NamedSharding(batch_sharding.mesh,
                                                                                 jax.sharding.PartitionSpec())
    adapted = lora is not None and lora.rank > 0
    base_in = (base_shardings,) if adapted else ()
    step = jax.jit(lambda state, batch, *base: train_step(state, batch, config, train, *base, lora=lora),
                   donate_argnums=0,
                   in_shardings=None if state_shardings is None else (state_shardings, batch_sharding, *base_in),
                   out_shardings=None if state_shardings is None else (state_shardings, replicated))
    evaluate = jax.jit(lambda params, batch, *base: eval_step(params, batch, config, train, *base, lora=lora),
                       in_shardings=None if state_shardings is None else (state_shardings.params, batch_sharding,
                                                                          *base_in))
    return step, evaluate
