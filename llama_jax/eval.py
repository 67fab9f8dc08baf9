"""Measure a checkpoint: perplexity on any text, and multiple-choice tasks scored by log-likelihood.

    python -m llama_jax.eval perplexity --checkpoint runs/tiny --data data/held_out.txt
    python -m llama_jax.eval choice --checkpoint runs/tiny --tasks llama_jax/examples/shakespeare_choice.jsonl

Perplexity reads the corpus formats training reads (text, JSONL, gzipped, directories, globs). Each document is
encoded with BOS first and every token after BOS is scored exactly once; a document longer than the context is
scored in sliding windows that give each token at least --stride tokens of context (score.windows). Reported per
file and in total: tokens, mean negative log-likelihood (nats per token), perplexity and bits per byte (the total
negative log-likelihood in bits over the text's UTF-8 bytes: comparable between models with different
tokenizers).

A task file is JSONL, one question per line:

    {"context": "The capital of France is", "choices": ["Paris", "Rome", "Berlin"], "answer": 0}

Each choice is scored as the continuation `context + delimiter + choice` (delimiter " " by default, as
lm-eval-harness's target_delimiter), tokenized as lm-eval-harness tokenizes a loglikelihood request (the whole
string, the context's tokens taken off its front). `acc` picks the choice with the highest log-likelihood;
`acc_norm` divides each by the choice's length in characters first (lm-eval-harness's acc and acc_norm).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from llama_jax import score
from llama_jax.errors import UserError


class EvalError(ValueError, UserError):
    """Bad input to an evaluation (a task file, a corpus): one line naming the file."""


def perplexity(params, config, tok, paths, *, window: int | None = None, stride: int | None = None,
               batch_tokens: int = 8192, text_field: str = "text", separator: str | None = None,
               utf8_errors: str = "strict", progress: bool = False) -> dict:
    """{"files": [per file], "total": {...}}, each with documents, tokens (scored), bytes, nll (mean nats per
    token), perplexity and bits_per_byte. Windows of `window` tokens (default: the context) overlapping by
    `stride` (default: half a window)."""
    from llama_jax.data import corpus as data

    files = data.expand_paths(paths)
    window = window or config.max_seq_len
    stride = window // 2 if stride is None else stride
    score.windows(1, window, stride)  # checks the stride before any work
    encoded = [(f, *encode_documents(tok, [f], text_field, separator, utf8_errors)) for f in files]
    total_tokens = sum(len(d) - 1 for _, docs, _ in encoded for d in docs)
    if total_tokens == 0:
        raise EvalError(f"{', '.join(map(str, paths))}: no text to score")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_tokens, unit="tok", desc="scoring", file=sys.stderr, disable=None)
    try:
        sums = [_nll(params, config, docs, window, stride, batch_tokens, bar.update if bar is not None else None)
                for _, docs, _ in encoded]
    finally:
        if bar is not None:
            bar.close()
    results = [_summary(str(f), len(docs), n, n_bytes, nll) for (f, docs, n_bytes), (nll, n) in zip(encoded, sums)]
    return {"files": results, "total": _summary("total", sum(len(docs) for _, docs, _ in encoded),
                                                sum(n for _, n in sums), sum(b for _, _, b in encoded),
                                                sum(nll for nll, _ in sums))}


def score_documents(params, config, docs, n_bytes: int, name: str, *, window: int, stride: int,
                    batch_tokens: int = 8192, progress=None) -> dict:
    """One set of encoded documents (encode_documents) scored in sliding windows: its summary (see perplexity).
    Training's train.eval_paths use it too."""
    nll, n = _nll(params, config, docs, window, stride, batch_tokens, progress)
    return _summary(name, len(docs), n, n_bytes, nll)


def _nll(params, config, docs, window, stride, batch_tokens, progress) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens scored) of the documents."""
    sums = score.nll_of_documents(params, config, docs, stride, batch_tokens, progress=progress, window=window)
    return sum(s for s, _ in sums), sum(k for _, k in sums)


def encode_documents(tok, paths, text_field: str = "text", separator: str | None = None,
                     utf8_errors: str = "strict") -> tuple[list[list[int]], int]:
    """(token ids of each non-empty document, BOS first; the documents' UTF-8 bytes), encoded on all cores."""
    from llama_jax.data import corpus as data

    texts = [t for _, t in data.iter_documents(paths, text_field, separator, utf8_errors) if t]
    return tok.encode_batch(texts, bos=True), sum(len(t.encode("utf-8")) for t in texts)


def eval_sets(entries, tok, text_field: str = "text", separator: str | None = None,
              utf8_errors: str = "strict") -> dict[str, tuple[list[list[int]], int]]:
    """train.eval_paths: {name: (documents, bytes)} from "name=path" entries (a bare path is named by its
    stem)."""
    out = {}
    for entry in entries:
        name, path = entry.split("=", 1) if "=" in entry else (Path(entry).stem, entry)
        if not name or name in out:
            raise EvalError(f"train.eval_paths: {'the name ' + repr(name) + ' is used twice' if name else entry!r}"
                            f"{'' if name else ': an empty name'} (give each entry as name=path)")
        docs, n_bytes = encode_documents(tok, [path], text_field, separator, utf8_errors)
        if not docs:
            raise EvalError(f"train.eval_paths: {path}: no text to score")
        out[name] = (docs, n_bytes)
    return out


def _summary(name, documents, tokens, n_bytes, nll) -> dict:
    mean = nll / tokens if tokens else float("nan")
    return {"path": name, "documents": documents, "tokens": tokens, "bytes": n_bytes, "nll": mean,
            "perplexity": math.exp(mean) if tokens else float("nan"),
            "bits_per_byte": score.bits_per_byte(nll, n_bytes)}


def read_tasks(path) -> list[dict]:
    """The questions of a task file (see the module docstring), each checked: one line naming the line if not."""
    from llama_jax.data.corpus import DataError, iter_jsonl

    tasks = []
    try:
        for where, q in iter_jsonl([path]):
            if not isinstance(q, dict):
                raise EvalError(f"{where}: expected an object with context, choices and answer")
            if not isinstance(q.get("context"), str):
                raise EvalError(f"{where}: \"context\" must be a string")
            choices = q.get("choices")
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c
                                                                            for c in choices):
                raise EvalError(f"{where}: \"choices\" must be a list of at least two non-empty strings")
            answer = q.get("answer")
            if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
                raise EvalError(f"{where}: \"answer\" must be the index of the right choice, 0 .. "
                                f"{len(choices) - 1}; got {json.dumps(answer)}")
            tasks.append(q)
    except DataError as e:
        raise EvalError(str(e)) from None
    if not tasks:
        raise EvalError(f"{path}: no questions (expected JSON lines with context, choices and answer)")
    return tasks


def loglikelihood_request(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval-harness splits a loglikelihood request: the context's trailing
    spaces move to the continuation, the whole string is encoded (with BOS) and the context's token count taken
    off its front, so the continuation's ids are those of the text as a whole."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation, bos=True)
    n_context = len(tok.encode(context, bos=True))
    return whole[:n_context], whole[n_context:]


def choice(params, config, tok, tasks: list[dict], delimiter: str = " ", batch_tokens: int = 8192) -> dict:
    """{"acc", "acc_norm", "n", "predictions": [(argmax, argmax normalised, answer)]} over the questions."""
    pairs, owners = [], []
    for i, q in enumerate(tasks):
        for c in q["choices"]:
            context, continuation = loglikelihood_request(tok, q["context"], delimiter + c)
            if not continuation:
                raise EvalError(f"question {i + 1}: the choice {c!r} adds no tokens to the context")
            pairs.append((context, continuation))
            owners.append(i)
    scores = score.score_continuations(params, config, pairs, batch_tokens)
    k, predictions = 0, []
    for q in tasks:
        lls = np.array([s for s, _ in scores[k:k + len(q["choices"])]])
        lengths = np.array([float(len(c)) for c in q["choices"]])
        predictions.append((int(np.argmax(lls)), int(np.argmax(lls / lengths)), q["answer"]))
        k += len(q["choices"])
    n = len(tasks)
    return {"acc": sum(p == a for p, _, a in predictions) / n, "acc_norm": sum(p == a for _, p, a in predictions) / n,
            "n": n, "predictions": predictions}


if __name__ == "__main__":  # python -m llama_jax.eval: the command line is llama_jax/cli/eval.py
    from llama_jax.cli import run

    run("eval")
