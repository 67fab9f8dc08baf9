"""Evaluation speed: scored tokens/s of perplexity (the path of `python -m llama_jax.eval perplexity`: windows of
the context, batched) against transformers.LlamaForCausalLM computing the same loss on the same weights and
tokens (its forward with labels, batch by batch), one run, side by side; also checks that both give the same loss.

    python benchmarks/bench_eval.py [--presets stories15M stories110M] [--tokens 32768] [--dtype float32]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import llama_jax as lj  # noqa: E402
from benchmarks.common import add_malloc_flag, hf_model, load_ours_into_hf, machine, set_malloc, table  # noqa: E402
from llama_jax import score  # noqa: E402


def ours(params, config, docs, batch_tokens):
    t = time.perf_counter()
    sums = score.nll_of_documents(params, config, docs, stride=config.max_seq_len // 2, batch_tokens=batch_tokens)
    return time.perf_counter() - t, sum(s for s, _ in sums) / sum(n for _, n in sums)


def theirs(model, docs, batch: int):
    """The same token windows (documents here fit the context: one window each), batch rows at a time."""
    import torch

    t = time.perf_counter()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(docs), batch):
            x = torch.tensor(docs[i:i + batch])
            loss = model(x, labels=x).loss.item()  # mean over the batch's scored tokens (all: equal lengths)
            k = x.shape[0] * (x.shape[1] - 1)
            total, n = total + loss * k, n + k
    return time.perf_counter() - t, total / n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["stories15M", "stories110M"])
    p.add_argument("--tokens", type=int, default=32768, help="tokens scored per implementation")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="our compute dtype")
    p.add_argument("--batch-tokens", type=int, default=8192)
    add_malloc_flag(p)
    args = p.parse_args()
    malloc = set_malloc(args)
    import torch

    print(f"machine: {machine()}; {malloc}; jax {jax.__version__}, torch {torch.__version__}")
    rows = []
    for preset in args.presets:
        config = lj.load_model_config(Path(__file__).resolve().parents[1] / "configs" / f"{preset}.yaml")
        params = lj.init_params(config, jax.random.key(0))
        hf = load_ours_into_hf(hf_model(config), config, params).eval()
        T = config.max_seq_len
        rng = np.random.default_rng(0)
        docs = [list(rng.integers(0, config.vocab_size, T)) for _ in range(max(1, args.tokens // T))]
        c = config.replace(dtype=args.dtype)
        ours(params, c, docs[:1], args.batch_tokens)  # compile
        ours(params, c, docs[:args.batch_tokens // T], args.batch_tokens)
        t_ours, nll_ours = ours(params, c, docs, args.batch_tokens)
        theirs(hf, docs[:1], max(1, args.batch_tokens // T))
        t_hf, nll_hf = theirs(hf, docs, max(1, args.batch_tokens // T))
        n = len(docs) * (T - 1)
        rows.append([preset, f"{T} x {len(docs)}", f"{n / t_hf:,.0f}", f"{n / t_ours:,.0f}", f"{t_hf / t_ours:.2f}x",
                     f"{abs(math.exp(nll_ours) / math.exp(nll_hf) - 1):.1e}"])
        print(rows[-1], flush=True)
    print(table(f"Perplexity scoring (CPU; ours in {args.dtype}, transformers float32; random weights and tokens)",
                ["preset", "window x windows", "transformers tok/s", "llama_jax tok/s", "speed-up",
                 "perplexity rel. diff"], rows))


if __name__ == "__main__":
    main()
