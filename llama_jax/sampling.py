"""Logits -> next token. Small pure functions of (logits [B, V], ...) that compose; `sample` chains them in the
usual order (repetition penalty, temperature, top-k, top-p, min-p) and draws with an explicit key.

Filters set excluded logits to -inf, so after any chain the softmax is the exact renormalised distribution over
the tokens that survive.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from llama_jax.errors import ArgumentError

NEG_INF = -jnp.inf


def apply_repetition_penalty(logits_BV, seen_BV, penalty: float):
    """CTRL-style: logits of tokens already seen are divided by `penalty` when positive, multiplied when not."""
    penalised = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV, penalised, logits_BV)


def top_k_filter(logits_BV, k: int):
    """Keeps the k largest logits of each row (every one, when k is the vocabulary's size or more)."""
    if k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return jnp.where(logits_BV >= kth_B1, logits_BV, NEG_INF)


def top_p_filter(logits_BV, p: float):
    """Keeps the smallest set of most likely tokens whose probability sums to at least p (nucleus sampling)."""
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of strictly more likely tokens
    keep_BV = before_BV < p
    threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV >= threshold_B1, logits_BV, NEG_INF)


def min_p_filter(logits_BV, min_p: float):
    """Keeps tokens whose probability is at least min_p times that of the most likely token."""
    cutoff_B1 = jnp.max(logits_BV, axis=-1, keepdims=True) + jnp.log(min_p)
    return jnp.where(logits_BV >= cutoff_B1, logits_BV, NEG_INF)


def filtered_logits(logits_BV, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    min_p: float | None = None, seen_BV=None, repetition_penalty: float | None = None):
    """The chain of filters `sample` draws from (temperature > 0)."""
    logits_BV = logits_BV.astype(jnp.float32)
    if repetition_penalty is not None and repetition_penalty != 1.0:
        logits_BV = apply_repetition_penalty(logits_BV, seen_BV, repetition_penalty)
    logits_BV = logits_BV / temperature
    if top_k is not None:
        logits_BV = top_k_filter(logits_BV, top_k)
    if top_p is not None and top_p < 1.0:
        logits_BV = top_p_filter(logits_BV, top_p)
    if min_p is not None and min_p > 0.0:
        logits_BV = min_p_filter(logits_BV, min_p)
    return logits_BV


def sample(logits_BV, key, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           min_p: float | None = None, seen_BV=None, repetition_penalty: float | None = None):
    """int32 [B] next tokens. temperature == 0 is greedy (argmax, after the repetition penalty)."""
    if temperature == 0:
        if repetition_penalty is not None and repetition_penalty != 1.0:
            logits_BV = apply_repetition_penalty(logits_BV, seen_BV, repetition_penalty)
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = filtered_logits(logits_BV, temperature, top_k, top_p, min_p, seen_BV, repetition_penalty)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty=None) -> None:
    """One-line errors for out-of-range sampling settings (raised before anything is compiled)."""
    for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                        ("repetition_penalty", repetition_penalty)):
        if value is not None and not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ArgumentError(f"{name}={value!r} must be a number", name)
    if temperature is None or not temperature >= 0:
        raise ArgumentError(f"temperature={temperature} must be >= 0 (0 means greedy)", "temperature")
    if top_k is not None and (not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 1):
        raise ArgumentError(f"top_k={top_k!r} must be a positive integer", "top_k")
    if top_p is not None and not 0 < top_p <= 1:
        raise ArgumentError(f"top_p={top_p} must be in (0, 1]", "top_p")
    if min_p is not None and not 0 <= min_p < 1:
        raise ArgumentError(f"min_p={min_p} must be in [0, 1)", "min_p")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ArgumentError(f"repetition_penalty={repetition_penalty} must be > 0", "repetition_penalty")


def filtered_logits_rows(logits_BV, temperature_B, top_k_B, top_p_B, min_p_B, seen_BV=None, penalty_B=None):
    """`filtered_logits` with settings per row (arrays, so rows with different settings share one compiled step):
    top_k 0 means off, top_p 1 off, min_p 0 off, penalty 1 off; a row with temperature 0 is filtered as at
    temperature 1 (its draw is the argmax anyway). The same chain and tie handling as the scalar filters."""
    logits_BV = logits_BV.astype(jnp.float32)
    if penalty_B is not None:
        penalised = apply_repetition_penalty(logits_BV, seen_BV, penalty_B[:, None])
        logits_BV = jnp.where((penalty_B != 1.0)[:, None], penalised, logits_BV)
    logits_BV = logits_BV / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
    V = logits_BV.shape[-1]

    def top_k_and_p(l_BV):
        sorted_BV = -jnp.sort(-l_BV, axis=-1)
        rank_V = jnp.arange(V)
        sorted_BV = jnp.where((top_k_B[:, None] <= 0) | (rank_V[None, :] < top_k_B[:, None]), sorted_BV, NEG_INF)
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p_B[:, None]) & (sorted_BV > NEG_INF)
        keep_BV = keep_BV.at[:, 0].set(True)  # the most likely token always survives
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(l_BV >= threshold_B1, l_BV, NEG_INF)

    # The sort is the expensive part: skipped when no row asks for top-k or top-p.
    needed = jnp.any((top_k_B > 0) | (top_p_B < 1.0))
    logits_BV = jax.lax.cond(needed, top_k_and_p, lambda l: l, logits_BV)
    cutoff_B1 = jnp.max(logits_BV, axis=-1, keepdims=True) + jnp.log(jnp.maximum(min_p_B, 1e-30))[:, None]
    return jnp.where((min_p_B[:, None] <= 0) | (logits_BV >= cutoff_B1), logits_BV, NEG_INF)


def sample_rows(logits_BV, keys_B, temperature_B, top_k_B, top_p_B, min_p_B, seen_BV=None, penalty_B=None):
    """int32 [B] next tokens with per-row settings and a key per row (so a row's draw does not depend on the
    other rows); temperature 0 rows take the argmax (after their repetition penalty). Also returns the filtered
    logits the draws came from."""
    filtered_BV = filtered_logits_rows(logits_BV, temperature_B, top_k_B, top_p_B, min_p_B, seen_BV, penalty_B)
    drawn_B = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys_B, filtered_BV)
    penalised = logits_BV if penalty_B is None else jnp.where(
        (penalty_B != 1.0)[:, None], apply_repetition_penalty(logits_BV, seen_BV, penalty_B[:, None]), logits_BV)
    greedy_B = jnp.argmax(penalised, axis=-1)
    return jnp.where(temperature_B > 0, drawn_B, greedy_B).astype(jnp.int32), filtered_BV
