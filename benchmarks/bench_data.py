"""Data pipeline throughput: tokenization MB/s of `prepare` on the default corpus with 1 and 2 threads, and loader
batches/s against the training step rate of the tiny and stories15M presets.

    python benchmarks/bench_data.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import llama_jax as lj  # noqa: E402
from benchmarks.common import machine, table  # noqa: E402
from llama_jax import optim
from llama_jax.config import TrainConfig  # noqa: E402
from llama_jax.data import corpus as data  # noqa: E402
from llama_jax.data import token_files  # noqa: E402
from llama_jax.data.shakespeare import default_corpus  # noqa: E402
from llama_jax.text.tokenizer import train_tokenizer  # noqa: E402
from llama_jax.train import step as T  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main():
    print(f"machine: {machine()}")
    corpus = default_corpus()
    mb = sum(f.stat().st_size for f in corpus.glob("*.txt")) / 1e6
    tmp = Path(tempfile.mkdtemp())
    texts = [t for _, t in data.iter_documents(corpus)]
    t = time.perf_counter()
    tok = train_tokenizer(texts, 2048, tmp / "tokenizer.model")
    train_s = time.perf_counter() - t
    rows = []
    for threads in (1, 2):
        out = tmp / f"prep{threads}"
        t = time.perf_counter()
        meta = data.prepare(corpus, tok, out, num_threads=threads, progress=False)
        s = time.perf_counter() - t
        rows.append([threads, f"{mb:.1f} MB", f"{s:.2f}s", f"{mb / s:.1f} MB/s"])
    n_tokens = meta["counts"]["train"]["tokens"] + meta["counts"]["val"]["tokens"]
    print(table(f"prepare() on the default corpus ({len(texts)} documents, {n_tokens:,} tokens; tokenizer "
                f"training took {train_s:.1f}s)", ["threads", "corpus", "time", "throughput"], rows))

    split = token_files.open_split(tmp / "prep2", "train", tok)
    rows = []
    for preset, batch, seq in (("tiny", 16, 128), ("stories15M", 8, 256)):
        config = lj.load_model_config(ROOT / "configs" / f"{preset}.yaml")
        loader = iter(data.Loader(split, seq, batch, data.LoaderState(0), prefetch=0))
        next(loader)
        t = time.perf_counter()
        n = 200
        for _ in range(n):
            next(loader)
        loader_rate = n / (time.perf_counter() - t)
        train = TrainConfig(batch_size=batch, seq_len=seq, warmup_steps=0)
        config = config.replace(vocab_size=max(config.vocab_size, tok.vocab_size))
        state = optim.init_state(config, train, jax.random.key(0))
        b = jax.tree.map(jnp.asarray, next(loader)[0])
        step, _ = T.jit_steps(config, train)
        state, m = step(state, b)
        jax.block_until_ready(m)
        t = time.perf_counter()
        for _ in range(5):
            state, m = step(state, b)
        jax.block_until_ready(m)
        step_rate = 5 / (time.perf_counter() - t)
        rows.append([preset, f"{batch}x{seq}", f"{loader_rate:,.0f}", f"{step_rate:.2f}",
                     f"{loader_rate / step_rate:,.0f}x"])
    print(table("Loader (one thread, no prefetch) against the training step", ["preset", "batch",
                "loader batches/s", "train steps/s", "headroom"], rows))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
