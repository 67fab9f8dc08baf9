"""KV-cached generation: one prefill over the (ragged) prompts, then one token per row per step.

Rows keep their own positions: row b's prompt occupies cache slots 0..len_b-1 and its i-th new token goes to slot
len_b + i, so a batch of prompts of different lengths gives each row exactly what it would give alone; no
left-padding, no position shifting. The decode step is shared by the `lax.while_loop` path (`generate`, one jit
for the whole generation) and the streaming path (`stream`, a Python loop over the jitted, cache-donating step).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import model, sampling
from llama_jax.config import ModelConfig
from llama_jax.errors import ArgumentError


@flax.struct.dataclass
class DecodeState:
    cache: model.KVCache  # the keys/values of every row's tokens so far
    lengths_B: jax.Array  # int32 [B]: positions of the cache each row has filled (where its next token goes)
    last_B: jax.Array  # int32 [B]: the token to feed next
    out_BM: jax.Array  # int32 [B, M]: the M = max_new_tokens generated tokens (-1 after a row's stop)
    i: jax.Array  # int32: how many have been generated per row
    done_B: jax.Array  # bool [B]: the row has produced a stop token
    seen_BV: jax.Array | None  # bool [B, V]: tokens seen so far (for the repetition penalty), else None
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Static sampling settings (hashable: part of the compiled function)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_tokens: tuple = ()

    def __call__(self, logits_BV, key, seen_BV):
        return sampling.sample(logits_BV, key, self.temperature, self.top_k, self.top_p, self.min_p, seen_BV,
                               self.repetition_penalty)


def _record(state: DecodeState, token_B, sampler: Sampler) -> DecodeState:
    """Appends this step's tokens (rows already done keep producing nothing new) and updates the stop flags."""
    stop = jnp.asarray(sampler.stop_tokens or (-1,), jnp.int32)
    out_BM = state.out_BM.at[:, state.i].set(jnp.where(state.done_B, -1, token_B))
    done_B = state.done_B | jnp.any(token_B[:, None] == stop[None, :], axis=-1)
    seen = state.seen_BV
    if seen is not None:
        seen = seen.at[jnp.arange(token_B.shape[0]), token_B].set(True)
    return state.replace(last_B=token_B, out_BM=out_BM, i=state.i + 1, done_B=done_B, seen_BV=seen)


def prefill(params, tokens_BP, lengths_B, config: ModelConfig, sampler: Sampler, max_len: int,
            max_new_tokens: int, key) -> DecodeState:
    """Runs the prompts [B, P] (right-padded, true lengths [B]) through the model, filling the cache, and samples
    each row's first new token from the logits at its last prompt position."""
    B, P = tokens_BP.shape
    cache = model.init_cache(config, B, max_len)
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    # Padding past a row's length is written to slots that the row's own new tokens overwrite before any query
    # can see them (a query at position p only attends to slots <= p).
    h_BPD, cache = model.hidden_cached(params, tokens_BP, positions_BP, cache, config, scan_layers=False)
    h_BD = h_BPD[jnp.arange(B), lengths_B - 1]
    logits_BV = model.logits(params, h_BD, config)
    seen = None
    if sampler.repetition_penalty not in (None, 1.0):
        valid_BP = jnp.arange(P)[None, :] < lengths_B[:, None]
        seen = jnp.zeros((B, config.vocab_size), bool).at[jnp.arange(B)[:, None], tokens_BP].max(valid_BP)
    key, sub = jax.random.split(key)
    state = DecodeState(cache=cache, lengths_B=lengths_B, last_B=jnp.zeros(B, jnp.int32),
                        out_BM=jnp.full((B, max_new_tokens), -1, jnp.int32), i=jnp.zeros((), jnp.int32),
                        done_B=jnp.zeros(B, bool), seen_BV=seen, key=key)
    return _record(state, sampler(logits_BV, sub, seen), sampler)


def decode_step(params, state: DecodeState, config: ModelConfig, sampler: Sampler) -> DecodeState:
    """Feeds each row's last token at its own position, then samples the next one. `params` should come from
    model.unstack_layers (see there why)."""
    positions_B1 = state.lengths_B[:, None]
    # Layers unrolled over per-layer weights, each layer's cache slab updated in place (a scan would slice the
    # stacked weights and carry the whole cache; see docs/benchmarks-log.md for the measured difference).
    h_B1D, cache = model.hidden_cached(params, state.last_B[:, None], positions_B1, state.cache, config,
                                       scan_layers=False)
    logits_BV = model.logits(params, h_B1D[:, 0], config)
    key, sub = jax.random.split(state.key)
    state = state.replace(cache=cache, lengths_B=state.lengths_B + 1, key=key)
    return _record(state, sampler(logits_BV, sub, state.seen_BV), sampler)


@functools.partial(jax.jit, static_argnames=("config", "sampler", "max_len", "max_new_tokens"))
def _generate_jit(params, tokens_BP, lengths_B, key, config, sampler, max_len, max_new_tokens):
    state = prefill(params, tokens_BP, lengths_B, config, sampler, max_len, max_new_tokens, key)
    cond = lambda s: (s.i < max_new_tokens) & ~jnp.all(s.done_B)
    return jax.lax.while_loop(cond, lambda s: decode_step(params, s, config, sampler), state).out_BM


_prefill_jit = jax.jit(prefill, static_argnames=("config", "sampler", "max_len", "max_new_tokens"))
_decode_jit = jax.jit(decode_step, static_argnames=("config", "sampler"), donate_argnums=1)


def as_prompt_lists(prompts) -> list[list[int]]:
    """Prompts as lists of Python ints, from a list of token-id sequences (lists, tuples, 1-D arrays) or a 2-D
    integer array (a row per prompt); a flat list of ids is refused, since it could mean one prompt or many."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        if prompts.ndim != 2:
            raise ArgumentError(f"prompts as an array must be 2-D [batch, length], got shape {prompts.shape}")
        prompts = list(prompts)
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ArgumentError("prompts must be a non-empty list of token-id lists, one per row")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (numbers.Integral, str)):
            raise ArgumentError(f"prompts[{i}] is {p!r}, not a list of token ids: prompts is a list of rows, e.g. "
                             "[[1, 42, 7]] for one prompt")
        arr = np.asarray(p)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ArgumentError(f"prompts[{i}] must be a sequence of integer token ids, got {arr.dtype} of shape "
                             f"{arr.shape}")
        out.append([int(t) for t in arr])
    return out


def _pad_prompts(prompts, config: ModelConfig, max_new_tokens: int):
    if any(len(p) == 0 for p in prompts):
        raise ArgumentError("empty prompt: every prompt needs at least one token (e.g. BOS)")
    if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ArgumentError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    max_new_tokens = int(max_new_tokens)
    lengths = np.array([len(p) for p in prompts], np.int32)
    need = int(lengths.max()) + max_new_tokens
    if need > config.max_seq_len:
        raise ArgumentError(f"prompt ({lengths.max()} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds "
                         f"the model's context of {config.max_seq_len} tokens")
    bad = [t for p in prompts for t in p if not 0 <= t < config.vocab_size]
    if bad:
        raise ArgumentError(f"token id {bad[0]} is outside the vocabulary [0, {config.vocab_size})")
    P = -(-int(lengths.max()) // 16) * 16  # bucketing prompt lengths bounds the number of compilations
    tokens = np.zeros((len(prompts), P), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = p
    max_len = min(-(-(P + max_new_tokens) // 64) * 64, config.max_seq_len)
    return jnp.asarray(tokens), jnp.asarray(lengths), max_len


def _trim(row, stop_tokens) -> list[int]:
    out = []
    for t in np.asarray(row).tolist():
        if t < 0:
            break
        out.append(t)
        if t in stop_tokens:
            break
    return out


def _prepare(params, config, prompts, max_new_tokens, temperature, top_k, top_p, min_p, stop_tokens,
             repetition_penalty):
    """Checks the arguments, pads the prompts and lays the weights out for decoding (shared by generate/stream)."""
    sampling.check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty)
    model.check_params(params, config)
    tokens, lengths, max_len = _pad_prompts(as_prompt_lists(prompts), config, max_new_tokens)
    as_float = lambda x: None if x is None else float(x)  # NumPy scalars become plain (hashable, static) numbers
    sampler = Sampler(float(temperature), None if top_k is None else int(top_k), as_float(top_p), as_float(min_p),
                      as_float(repetition_penalty), tuple(int(t) for t in np.ravel(np.asarray(stop_tokens, int))))
    return model.unstack_layers(params, config.dtype), tokens, lengths, max_len, sampler


def generate(params, config: ModelConfig, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, seed: int = 0, stop_tokens=(), repetition_penalty: float | None = None
             ) -> list[list[int]]:
    """New tokens for each prompt (token-id lists of any lengths), each list ending at (and including) its first
    stop token. temperature=0 is greedy. The whole generation is one jitted prefill + lax.while_loop. It computes
    in config.dtype; on a CPU float32 decodes faster than bfloat16 (docs/benchmarks-log.md)."""
    params, tokens, lengths, max_len, sampler = _prepare(params, config, prompts, max_new_tokens, temperature, top_k,
                                                         top_p, min_p, stop_tokens, repetition_penalty)
    out = _generate_jit(params, tokens, lengths, jax.random.key(seed), config, sampler, max_len, int(max_new_tokens))
    return [_trim(row, sampler.stop_tokens) for row in np.asarray(out)]


def stream(params, config: ModelConfig, prompts: list[list[int]], *, max_new_tokens: int,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           min_p: float | None = None, seed: int = 0, stop_tokens=(), repetition_penalty: float | None = None
           ) -> Iterator[np.ndarray]:
    """Yields int32 [B] tokens step by step (-1 for rows already stopped); same tokens as `generate`. The
    arguments are checked when it is called, before the first token is asked for."""
    params, tokens, lengths, max_len, sampler = _prepare(params, config, prompts, max_new_tokens, temperature, top_k,
                                                         top_p, min_p, stop_tokens, repetition_penalty)
    return _stream(params, tokens, lengths, max_len, sampler, config, int(max_new_tokens), seed)


def _stream(params, tokens, lengths, max_len, sampler, config, max_new_tokens, seed):
    state = _prefill_jit(params, tokens, lengths, config, sampler, max_len, max_new_tokens, jax.random.key(seed))
    for i in range(max_new_tokens):
        if i > 0:
            state = _decode_jit(params, state, config, sampler)
        yield np.asarray(state.out_BM[:, i])
        if bool(np.all(np.asarray(state.done_B))):
            return
