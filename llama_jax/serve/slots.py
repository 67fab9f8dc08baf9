"""The engine's compiled functions over its pool of KV-cache slots (engine.py schedules them; no host state here).

The pool is a `SlotPool`: a KV cache whose B rows are the slots, and per slot its length, last token, whether it is
active, how many tokens it has drawn, the tokens it has seen (for the repetition penalty) and its `SlotSampling`
settings. Settings are arrays rather than static arguments, so requests with different temperatures, top-p or
seeds share one compiled step; each slot draws with its own key (its seed folded with the token's index), so a
request's tokens do not depend on what else runs beside it. Shape letters as in model.py (B: the slots).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from llama_jax import model, sampling
from llama_jax.config import ModelConfig

TOP_LOGPROBS = 20  # alternatives computed per token when a request asks for any (OpenAI allows up to 20)


@flax.struct.dataclass
class SlotSampling:
    """Sampling settings per slot ([B] arrays), or of one request (scalars) when handed to `begin`."""

    temperature: jax.Array  # float32; 0 is greedy
    top_k: jax.Array  # int32; 0 keeps every token
    top_p: jax.Array  # float32; 1 keeps every token
    min_p: jax.Array  # float32; 0 keeps every token
    penalty: jax.Array  # float32 repetition penalty; 1 is none
    seed: jax.Array  # uint32: the request's draws are its seed folded with each token's index


@flax.struct.dataclass
class SlotPool:
    cache: model.KVCache  # B = max_batch rows of max_len positions
    lengths_B: jax.Array  # int32: positions filled (where the slot's next token goes)
    last_B: jax.Array  # int32: the token to feed next
    active_B: jax.Array  # bool: the slot holds a running request
    count_B: jax.Array  # int32: tokens drawn for the slot's request (folded into its key)
    seen_BV: jax.Array  # bool: tokens in the slot's prompt and output (for the repetition penalty)
    sampling: SlotSampling


def empty_pool(config: ModelConfig, max_batch: int, max_len: int) -> SlotPool:
    """A pool of `max_batch` inactive slots of `max_len` tokens."""
    B, V = max_batch, config.vocab_size
    settings = SlotSampling(temperature=jnp.ones(B, jnp.float32), top_k=jnp.zeros(B, jnp.int32),
                            top_p=jnp.ones(B, jnp.float32), min_p=jnp.zeros(B, jnp.float32),
                            penalty=jnp.ones(B, jnp.float32), seed=jnp.zeros(B, jnp.uint32))
    return SlotPool(cache=model.init_cache(config, B, max_len), lengths_B=jnp.zeros(B, jnp.int32),
                    last_B=jnp.zeros(B, jnp.int32), active_B=jnp.zeros(B, bool), count_B=jnp.zeros(B, jnp.int32),
                    seen_BV=jnp.zeros((B, V), bool), sampling=settings)


@functools.partial(jax.jit, donate_argnums=0)
def deactivate(pool: SlotPool, slot) -> SlotPool:
    """The slot stops counting as active (its finished request's cache rows stay until a prompt overwrites them)."""
    return pool.replace(active_B=pool.active_B.at[slot].set(False))


def _step_keys(seed_B, count_B):
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seed_B, count_B)


def _sample(logits_BV, s: SlotSampling, count_B, seen_BV, active_B, want_logprobs):
    """Next tokens of every slot; with want_logprobs (some slot asked for them) also their log-probabilities under
    the model (before any filter, as OpenAI's `logprobs`) and the top alternatives. The random draws and the
    log-softmax are skipped when no slot needs them (all greedy; no logprobs)."""
    B = logits_BV.shape[0]
    logits_BV = logits_BV.astype(jnp.float32)

    def draw(l_BV):
        return sampling.sample_rows(l_BV, _step_keys(s.seed, count_B), s.temperature, s.top_k, s.top_p, s.min_p,
                                    seen_BV, s.penalty)[0]

    def greedy(l_BV):
        penalised_BV = sampling.apply_repetition_penalty(l_BV, seen_BV, s.penalty[:, None])
        return jnp.argmax(jnp.where((s.penalty != 1.0)[:, None], penalised_BV, l_BV), axis=-1).astype(jnp.int32)

    # Inactive slots keep their last occupant's settings: only the active ones decide (a draw costs a random
    # number per vocabulary entry and row).
    token_B = jax.lax.cond(jnp.any((s.temperature > 0) & active_B), draw, greedy, logits_BV)

    def logprobs(l_BV):
        logp_BV = jax.nn.log_softmax(l_BV, axis=-1)
        values_BA, ids_BA = jax.lax.top_k(logp_BV, TOP_LOGPROBS)
        return jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0], ids_BA.astype(jnp.int32), values_BA

    nothing = lambda l_BV: (jnp.zeros(B, l_BV.dtype), jnp.zeros((B, TOP_LOGPROBS), jnp.int32),
                            jnp.zeros((B, TOP_LOGPROBS), l_BV.dtype))
    lp_B, top_ids_BA, top_lp_BA = jax.lax.cond(want_logprobs, logprobs, nothing, logits_BV)
    return token_B, lp_B, top_ids_BA, top_lp_BA


def decode_step(params, pool: SlotPool, want_logprobs, *, config: ModelConfig, rows: int | None = None):
    """Every active slot feeds its last token at its own position and samples the next one. Inactive slots run
    too (static shapes) but change nothing that matters: their length stays, their output is ignored. `rows`: run
    only the first `rows` slots (the engine hands out the lowest free slot and compiles one step per power of
    two, so one request pays a one-row step); the outputs then have `rows` rows and the other slots are as they
    were."""
    B = pool.lengths_B.shape[0]
    if rows is None or rows == B:
        return _decode_rows(params, pool, want_logprobs, config)
    # The per-slot state of the first `rows` slots is sliced out and put back (small); the cache is not: the
    # model writes and reads those slots' rows of the whole pool's cache in place.
    head = lambda x: jax.lax.slice_in_dim(x, 0, rows)
    sub = jax.tree.map(head, pool.replace(cache=None)).replace(cache=pool.cache)
    sub, out = _decode_rows(params, sub, want_logprobs, config)
    put = lambda big, small: jax.lax.dynamic_update_slice_in_dim(big, small, 0, 0)
    rest = jax.tree.map(put, pool.replace(cache=None), sub.replace(cache=None))
    return rest.replace(cache=sub.cache), out


def decode_steps(params, pool: SlotPool, want_logprobs, *, config: ModelConfig, rows: int | None = None,
                 steps: int = 1):
    """`steps` decode steps in one call (outputs stacked: [steps, rows, ...]). A call has a fixed cost beside its
    work, large next to a small model's one-row step (docs/benchmarks.md#serving): a request alone runs a few
    steps a call (engine.py decides when)."""
    return jax.lax.scan(lambda p, _: decode_step(params, p, want_logprobs, config=config, rows=rows), pool, None,
                        length=steps)


def _decode_rows(params, pool: SlotPool, want_logprobs, config: ModelConfig):
    positions_B1 = jnp.minimum(pool.lengths_B, pool.cache.max_len - 1)[:, None]
    h_B1D, cache = model.hidden_cached(params, pool.last_B[:, None], positions_B1, pool.cache, config,
                                       scan_layers=False)
    logits_BV = model.logits(params, h_B1D[:, 0], config)
    token_B, lp_B, top_ids_BA, top_lp_BA = _sample(logits_BV, pool.sampling, pool.count_B, pool.seen_BV,
                                                   pool.active_B, want_logprobs)
    active_B = pool.active_B
    seen_BV = pool.seen_BV.at[jnp.arange(token_B.shape[0]), token_B].max(active_B)
    pool = pool.replace(cache=cache, lengths_B=pool.lengths_B + active_B, last_B=token_B,
                        count_B=pool.count_B + active_B, seen_BV=seen_BV)
    return pool, (token_B, lp_B, top_ids_BA, top_lp_BA)


def begin(pool: SlotPool, slot, source, prompt_1S, length, reused, settings: SlotSampling, *,
          copy: bool) -> SlotPool:
    """Readies a slot for a prompt (`length` tokens of prompt_1S, padded to the pool's length) whose first `reused`
    tokens already have keys/values in the `source` slot's rows (with `copy`, another slot's rows copied over;
    without, the slot's own): the slot takes the request's sampling settings and the prompt's tokens (for the
    repetition penalty), and its length becomes `reused`, where `prefill_chunk` goes on. It stays inactive until
    the last chunk."""
    K, S = pool.cache.k[0].shape[0] // pool.lengths_B.shape[0], pool.cache.max_len
    if not (prompt_1S.shape == (1, S)):
        raise ValueError(f"begin: the prompt must be padded to [1, {S}], got {prompt_1S.shape}")

    cache = pool.cache
    if copy:  # static: a slot reusing its own rows (or nothing) copies nothing
        rows = lambda x_ZSH: jax.lax.dynamic_slice_in_dim(x_ZSH, source * K, K)
        cache = jax.tree.map(lambda x_ZSH: jax.lax.dynamic_update_slice_in_dim(x_ZSH, rows(x_ZSH), slot * K, 0), cache)
    seen_V = jnp.zeros(pool.seen_BV.shape[1], bool).at[prompt_1S[0]].max(jnp.arange(S) < length)
    at = lambda x_B, value: x_B.at[slot].set(value)
    return pool.replace(cache=cache, lengths_B=at(pool.lengths_B, reused), active_B=at(pool.active_B, False),
                        count_B=at(pool.count_B, 0), seen_BV=pool.seen_BV.at[slot].set(seen_V),
                        sampling=jax.tree.map(at, pool.sampling, settings))


def prefill_chunk(params, pool: SlotPool, tokens_1C, n, slot, last, want_logprobs, *, config: ModelConfig):
    """Runs a chunk of a slot's prompt: its first `n` tokens of tokens_1C (right-padded to the chunk shape C) at
    positions length .. length + n - 1 of the slot, over the keys/values already there (a reused prefix, earlier
    chunks). With `last` (the prompt's final chunk) the slot samples its first token and becomes active; the
    outputs are that token, its log-probability and top alternatives (meaningless unless `last`).

    Padding tokens write keys/values past the prompt (masked until a later token overwrites them) or past the
    cache (dropped); a decode step running meanwhile writes only at the slot's length, where the next chunk
    starts."""
    C = tokens_1C.shape[1]
    start = pool.lengths_B[slot]
    h_1CD, cache = model.hidden_cached(params, tokens_1C, (start + jnp.arange(C, dtype=jnp.int32))[None], pool.cache,
                                       config, scan_layers=False, first_row=slot)
    logits_1V = model.logits(params, jax.lax.dynamic_slice_in_dim(h_1CD[0], n - 1, 1), config)
    one = lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1)
    seen_1V = one(pool.seen_BV)
    token_1, lp_1, top_ids_1A, top_lp_1A = _sample(logits_1V, jax.tree.map(one, pool.sampling),
                                                   jnp.zeros(1, jnp.int32), seen_1V, jnp.ones(1, bool), want_logprobs)
    at = lambda x_B, value: x_B.at[slot].set(value)
    pool = pool.replace(
        cache=cache, lengths_B=at(pool.lengths_B, start + n), last_B=at(pool.last_B, token_1[0]),
        active_B=at(pool.active_B, last), count_B=at(pool.count_B, last.astype(jnp.int32)),
        seen_BV=pool.seen_BV.at[slot, token_1[0]].max(last))
    return pool, token_1[0], lp_1[0], top_ids_1A[0], top_lp_1A[0]
