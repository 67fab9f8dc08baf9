"""The engine's compiled functions over its pool of KV-cache slots (engine.py schedules them; no host state here).

The pool is one dict of arrays with a leading slot axis: per layer a KV cache of `max_batch` rows, and per slot its
length, last token, whether it is active, how many tokens it has drawn, the already-seen tokens (for the
repetition penalty) and its sampling settings. Settings are arrays rather than static arguments, so requests with
different temperatures, top-p or seeds share one compiled step; each slot draws with its own key (its seed folded
with the token's index), so a request's tokens do not depend on what else runs beside it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llama_jax import model, sampling
from llama_jax.config import ModelConfig

TOP_LOGPROBS = 20  # alternatives computed per token when a request asks for any (OpenAI allows up to 20)


def empty_state(config: ModelConfig, max_batch: int, max_len: int) -> dict:
    """A pool of `max_batch` inactive slots of `max_len` tokens."""
    S, V = max_batch, config.vocab_size
    cache = model.init_cache(config, S, max_len)
    return {"k": cache["k"], "v": cache["v"], "lengths": jnp.zeros(S, jnp.int32), "last": jnp.zeros(S, jnp.int32),
            "active": jnp.zeros(S, bool), "count": jnp.zeros(S, jnp.int32),
            "temperature": jnp.ones(S, jnp.float32), "top_k": jnp.zeros(S, jnp.int32),
            "top_p": jnp.ones(S, jnp.float32), "min_p": jnp.zeros(S, jnp.float32),
            "penalty": jnp.ones(S, jnp.float32), "seed": jnp.zeros(S, jnp.uint32), "seen": jnp.zeros((S, V), bool)}


@functools.partial(jax.jit, donate_argnums=0)
def deactivate(state, slot):
    """The slot stops counting as active (its finished request's cache rows stay until a prompt overwrites them)."""
    return dict(state, active=state["active"].at[slot].set(False))


def _step_keys(seed_S, count_S):
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seed_S, count_S)


def _sample(logits_SV, state, want_logprobs):
    """Next tokens of every slot; with want_logprobs (some slot asked for them) also their log-probabilities under
    the model (before any filter, as OpenAI's `logprobs`) and the top alternatives. The random draws and the
    log-softmax are skipped when no slot needs them (all greedy; no logprobs)."""
    S = logits_SV.shape[0]
    logits_SV = logits_SV.astype(jnp.float32)

    def draw(l):
        return sampling.sample_rows(l, _step_keys(state["seed"], state["count"]), state["temperature"],
                                    state["top_k"], state["top_p"], state["min_p"], state["seen"],
                                    state["penalty"])[0]

    def greedy(l):
        penalised = sampling.apply_repetition_penalty(l, state["seen"], state["penalty"][:, None])
        return jnp.argmax(jnp.where((state["penalty"] != 1.0)[:, None], penalised, l), axis=-1).astype(jnp.int32)

    # Inactive slots keep their last occupant's settings: only the active ones decide (a draw costs a random
    # number per vocabulary entry and row).
    token_S = jax.lax.cond(jnp.any((state["temperature"] > 0) & state["active"]), draw, greedy, logits_SV)

    def logprobs(l):
        logp_SV = jax.nn.log_softmax(l, axis=-1)
        values, ids = jax.lax.top_k(logp_SV, TOP_LOGPROBS)
        return jnp.take_along_axis(logp_SV, token_S[:, None], axis=-1)[:, 0], ids.astype(jnp.int32), values

    nothing = lambda l: (jnp.zeros(S, l.dtype), jnp.zeros((S, TOP_LOGPROBS), jnp.int32),
                         jnp.zeros((S, TOP_LOGPROBS), l.dtype))
    lp_S, top_ids, top_lp = jax.lax.cond(want_logprobs, logprobs, nothing, logits_SV)
    return token_S, lp_S, top_ids, top_lp


def decode_step(params, state, want_logprobs, *, config: ModelConfig):
    """Every active slot feeds its last token at its own position and samples the next one. Inactive slots run
    too (static shapes) but change nothing that matters: their length stays, their output is ignored."""
    kv = {"k": state["k"], "v": state["v"]}
    positions = jnp.minimum(state["lengths"], kv["k"][0].shape[1] - 1)[:, None]
    h_S1D, kv = model.hidden_cached(params, state["last"][:, None], positions, kv, config, scan_layers=False)
    logits_SV = model.logits(params, h_S1D[:, 0], config)
    token_S, lp_S, top_ids, top_lp = _sample(logits_SV, state, want_logprobs)
    active = state["active"]
    S = token_S.shape[0]
    seen = state["seen"].at[jnp.arange(S), token_S].max(active)
    state = dict(state, k=kv["k"], v=kv["v"], lengths=state["lengths"] + active, last=token_S,
                 count=state["count"] + active, seen=seen)
    return state, (token_S, lp_S, top_ids, top_lp)


def prefill(params, state, tokens_1P, length, slot, settings, want_logprobs, *, config: ModelConfig):
    """Runs one prompt (right-padded to its bucket) into a fresh cache and copies that into the slot's rows of the
    pool; sets the slot's sampling settings and samples its first token."""
    P = tokens_1P.shape[1]
    K = config.n_kv_heads
    fresh = model.init_cache(config, 1, P)
    h_1PD, fresh = model.hidden_cached(params, tokens_1P, jnp.arange(P, dtype=jnp.int32)[None], fresh, config,
                                       scan_layers=False)
    logits_1V = model.logits(params, jax.lax.dynamic_slice_in_dim(h_1PD[0], length - 1, 1), config)
    put = lambda big, small: jax.lax.dynamic_update_slice(big, small.astype(big.dtype), (slot * K, 0, 0))
    seen_V = jnp.zeros(config.vocab_size, bool).at[tokens_1P[0]].max(jnp.arange(P) < length)
    set_ = lambda name, value: state[name].at[slot].set(value)
    state = dict(state, k=[put(b, s) for b, s in zip(state["k"], fresh["k"])],
                 v=[put(b, s) for b, s in zip(state["v"], fresh["v"])],
                 **{name: set_(name, settings[name]) for name in ("temperature", "top_k", "top_p", "min_p",
                                                                   "penalty", "seed")},
                 count=set_("count", 0), seen=state["seen"].at[slot].set(seen_V))
    row = {k: jax.lax.dynamic_slice_in_dim(v, slot, 1) for k, v in state.items() if k not in ("k", "v")}
    row["active"] = jnp.ones(1, bool)
    token, lp, top_ids, top_lp = _sample(logits_1V, row, want_logprobs)
    state = dict(state, lengths=set_("lengths", length), last=set_("last", token[0]), active=set_("active", True),
                 count=set_("count", 1), seen=state["seen"].at[slot, token[0]].set(True))
    return state, token[0], lp[0], top_ids[0], top_lp[0]
