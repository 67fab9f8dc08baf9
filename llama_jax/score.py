"""Scoring text: per-token log-probabilities, the primitive behind perplexity, log-likelihood benchmarks (the
(sum of log-probabilities, would greedy decoding have produced it) pair of lm-eval-harness) and the server's
`echo` / `logprobs`.

    lp = lj.token_logprobs(params, tokens_BT, config, lengths_B)      # [B, T]: log p(token t | tokens before t)
    [(logprob, greedy)] = lj.score_continuations(params, config, [(context_ids, continuation_ids)])

Batches are ragged: rows are right-padded and causal attention never lets a token see the padding after it, so a
row scores the same in any batch. Like the training loss, logits exist only `chunk` positions at a time (a
long document never holds T x V floats); the log-softmax is logsumexp minus the target's logit.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import model
from llama_jax.config import ModelConfig
from llama_jax.errors import ArgumentError


@functools.partial(jax.jit, static_argnames=("config", "top", "chunk"))
def token_logprobs(params, tokens_BT, config: ModelConfig, lengths_B=None, *, top: int = 0, chunk: int = 128):
    """Scores each token given the ones before it. Returns a dict of
      "logprobs": float32 [B, T], log p(tokens[b, t] | tokens[b, :t]); 0 at t = 0 (nothing predicts the first
                  token) and at t >= lengths[b] (padding);
      "greedy":   bool [B, T], whether tokens[b, t] is the argmax of that prediction (what greedy decoding picks);
      with top=K also "top_ids" int32 [B, T, K] and "top_logprobs" float32 [B, T, K]: the K most likely tokens at
      position t (the prediction for t, made at t - 1) and their log-probabilities."""
    B, T = tokens_BT.shape
    lengths_B = jnp.full((B,), T, jnp.int32) if lengths_B is None else lengths_B
    h_BTD = model.hidden_states(params, tokens_BT, config)
    w, transposed = model.head_matrix(params)
    w = w.astype(h_BTD.dtype)
    # Position t's hidden state predicts token t + 1.
    h_RD = h_BTD[:, :-1].reshape(-1, h_BTD.shape[-1])
    t_R = tokens_BT[:, 1:].reshape(-1)

    def score(h_CD, t_C):
        logits_CV = model.lm_head(h_CD, w, transposed).astype(jnp.float32)
        lse_C = jax.nn.logsumexp(logits_CV, axis=-1)
        target_C = jnp.take_along_axis(logits_CV, t_C[:, None], axis=-1)[:, 0]
        out = {"logprobs": target_C - lse_C, "greedy": jnp.argmax(logits_CV, axis=-1) == t_C}
        if top:
            values_CA, ids_CA = jax.lax.top_k(logits_CV, top)
            out |= {"top_ids": ids_CA.astype(jnp.int32), "top_logprobs": values_CA - lse_C[:, None]}
        return out

    n = h_RD.shape[0]
    if n <= chunk:
        out = score(h_RD, t_R)
    else:
        pad = -n % chunk
        h_JCD = jnp.pad(h_RD, ((0, pad), (0, 0))).reshape(-1, chunk, h_RD.shape[-1])
        t_JC = jnp.pad(t_R, (0, pad)).reshape(-1, chunk)
        out = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:n], jax.lax.map(lambda a: score(*a), (h_JCD, t_JC)))
    valid_BT = (jnp.arange(T)[None, :] >= 1) & (jnp.arange(T)[None, :] < lengths_B[:, None])
    first = lambda x, fill: jnp.concatenate([jnp.full((B, 1, *x.shape[1:]), fill, x.dtype),
                                             x.reshape(B, T - 1, *x.shape[1:])], axis=1)
    out = {k: first(v, 0 if k != "greedy" else True) for k, v in out.items()}
    out["logprobs"] = jnp.where(valid_BT, out["logprobs"], 0.0)
    out["greedy"] = out["greedy"] | ~valid_BT
    return out


def bucket(n: int, minimum: int = 16) -> int:
    """Padded length for n tokens: the next power of two (at least `minimum`), so that a run over many lengths
    compiles a handful of shapes, and the padding stays under half."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def score_batches(params, config: ModelConfig, sequences: list[list[int]], batch_tokens: int = 8192, top: int = 0):
    """token_logprobs over many sequences (each at most config.max_seq_len tokens), batched by length: rows of
    similar length share a padded batch of about `batch_tokens` tokens. Returns, for each sequence in order, a
    dict of NumPy arrays over its own length (the keys of token_logprobs)."""
    if not sequences:
        return []
    too_long = [i for i, s in enumerate(sequences) if len(s) > config.max_seq_len or len(s) == 0]
    if too_long:
        n = len(sequences[too_long[0]])
        raise ArgumentError(f"sequence {too_long[0]} has {n} tokens; each must have 1 .. {config.max_seq_len}")
    params = jax.tree.map(jnp.asarray, params)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    results: list = [None] * len(sequences)
    i = 0
    while i < len(order):
        T = min(bucket(len(sequences[order[i]])), config.max_seq_len)
        rows = [order[i]]
        # grow the batch with the next (longer or equal) rows while their bucket is the same and it fits
        while (i + len(rows) < len(order) and (len(rows) + 1) * T <= max(batch_tokens, T)
               and len(sequences[order[i + len(rows)]]) <= T):
            rows.append(order[i + len(rows)])
        B = bucket(len(rows), 1)  # pad the batch too: shapes stay few
        tokens = np.zeros((B, T), np.int32)
        lengths = np.ones(B, np.int32)
        for b, r in enumerate(rows):
            tokens[b, :len(sequences[r])] = sequences[r]
            lengths[b] = len(sequences[r])
        out = jax.device_get(token_logprobs(params, jnp.asarray(tokens), config, jnp.asarray(lengths), top=top))
        for b, r in enumerate(rows):
            results[r] = {k: v[b, :lengths[b]] for k, v in out.items()}
        i += len(rows)
    return results


def score_continuations(params, config: ModelConfig, pairs, batch_tokens: int = 8192) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding from the context gives the continuation) for
    each (context ids, continuation ids) pair: lm-eval-harness's loglikelihood request. The context should start
    with BOS where the model expects one; a pair longer than the context window keeps its last max_seq_len
    tokens (the continuation must fit)."""
    sequences, starts = [], []
    for i, (context, continuation) in enumerate(pairs):
        context, continuation = [int(t) for t in context], [int(t) for t in continuation]
        if not continuation or not context:
            raise ArgumentError(f"pair {i}: the context and the continuation each need at least one token")
        if len(continuation) >= config.max_seq_len:
            raise ArgumentError(f"pair {i}: a continuation of {len(continuation)} tokens does not fit the context "
                             f"window of {config.max_seq_len}")
        whole = (context + continuation)[-config.max_seq_len:]
        sequences.append(whole)
        starts.append(len(whole) - len(continuation))
    out = score_batches(params, config, sequences, batch_tokens)
    return [(float(np.sum(o["logprobs"][s:], dtype=np.float64)), bool(np.all(o["greedy"][s:])))
            for o, s in zip(out, starts)]


def windows(n: int, width: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows (start, end, first scored) that score tokens 1 .. n-1 of an n-token sequence each exactly
    once with windows of at most `width` tokens: the first window scores from token 1; each later one starts
    `stride` tokens before the previous end, so every token it scores sees at least `stride` tokens of context."""
    if not 1 <= stride < width:
        raise ArgumentError(f"stride={stride} must be in [1, {width}) (the window is {width} tokens)")
    out, end = [], 0
    while end < n:
        start = max(0, end - stride)
        out.append((start, min(n, start + width), max(end, 1)))
        end = out[-1][1]
    return out


def nll_of_documents(params, config: ModelConfig, documents: list[list[int]], stride: int,
                     batch_tokens: int = 8192, progress=None, window: int | None = None) -> list[tuple[float, int]]:
    """(sum of negative log-likelihoods in nats, tokens scored) per document (token lists, BOS first), long ones
    scored with sliding windows of `window` tokens (default: the context; see `windows`). `progress(n)` is called
    with the tokens scored per batch."""
    window = min(window or config.max_seq_len, config.max_seq_len)
    pieces, owner = [], []
    for d, doc in enumerate(documents):
        for start, end, first in windows(len(doc), window, stride):
            pieces.append((doc[start:end], first - start))
            owner.append(d)
    totals = [[0.0, 0] for _ in documents]
    step = max(1, batch_tokens // max(1, min(config.max_seq_len, 512)) * 4)
    for i in range(0, len(pieces), step):
        part = pieces[i:i + step]
        for (seq, first), o, d in zip(part, score_batches(params, config, [p for p, _ in part], batch_tokens),
                                      owner[i:i + step]):
            totals[d][0] -= float(np.sum(o["logprobs"][first:], dtype=np.float64))
            totals[d][1] += len(seq) - first
        if progress is not None:
            progress(sum(len(seq) - first for seq, first in part))
    return [(nll, n) for nll, n in totals]


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Total negative log-likelihood as bits per UTF-8 byte of the text: comparable across tokenizers."""
    return nll_nats / (math.log(2) * n_bytes) if n_bytes else float("nan")


def sampling_candidates(params, config: ModelConfig, tokens: list[int], n_prompt: int, k: int,
                        temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                        min_p: float | None = None, repetition_penalty: float | None = None) -> list[dict]:
    """What the sampler chose from, for each token after the first n_prompt: {"token": the one generated,
    "candidates": the k most likely [(id, probability after temperature and the filters (0 when cut), before
    the filters, the filter that cut it: "top-k", "top-p", "min-p" or None)]}. Greedy decoding (temperature 0)
    shows the distribution at temperature 1, unfiltered (the argmax ignores the filters)."""
    from llama_jax import sampling

    logits_TV = np.asarray(model.forward(params, jnp.asarray([tokens], jnp.int32), config)[0], np.float32)
    greedy = temperature == 0
    out = []
    for t in range(n_prompt, len(tokens)):
        seen_1V = np.zeros((1, config.vocab_size), bool)
        seen_1V[0, tokens[:t]] = True
        stages = [sampling.filtered_logits(logits_TV[t - 1][None], 1.0 if greedy else temperature, None, None, None,
                                           seen_1V, repetition_penalty)]
        names = []
        if not greedy:
            for name, kw in (("top-k", {"top_k": top_k}), ("top-p", {"top_p": top_p}), ("min-p", {"min_p": min_p})):
                if next(iter(kw.values())) is not None:
                    stages.append(sampling.filtered_logits(stages[-1], 1.0, **kw))
                    names.append(name)
        stages = [np.asarray(s[0]) for s in stages]
        before, after = np.asarray(jax.nn.softmax(stages[0])), np.asarray(jax.nn.softmax(stages[-1]))
        top = np.argsort(-before, kind="stable")[:k]
        cut = lambda i: next((names[j] for j in range(len(names)) if np.isneginf(stages[j + 1][i])), None)
        out.append({"token": int(tokens[t]),
                    "candidates": [(int(i), float(after[i]), float(before[i]), cut(i)) for i in top]})
    return out
