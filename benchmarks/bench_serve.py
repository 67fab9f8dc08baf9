"""Serving throughput and latency: the OpenAI-compatible server (engine with continuous batching, HTTP, streaming)
with 1, 4 and 16 concurrent streaming clients, against the same requests run one after another with lj.generate
and the same 16 requests given to lj.generate as one static batch (the ceiling of batching on this hardware).

Prompt lengths 16-256 drawn with a fixed seed, 128 new tokens each, greedy, random weights of each preset's shape;
each client sends two requests, one after the other (the 16 clients: all 16 prompts).
Reports aggregate generated tokens/s, p50/p95 time to first token (TTFT) and inter-token latency (ITL), and the
number of compilations after the server's warm-up (should be 0).

    python benchmarks/bench_serve.py [--presets stories15M stories110M] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import llama_jax as lj  # noqa: E402
from benchmarks.common import add_malloc_flag, machine, set_malloc, table  # noqa: E402
from llama_jax.serve.api import Server  # noqa: E402
from llama_jax.serve.engine import Engine  # noqa: E402


class _NoText:
    """Random weights have no tokenizer: the server streams token ids; text is not measured."""

    vocab_size = 0

    def decode(self, ids):
        return ""

    def encode(self, text, bos=False):
        raise ValueError("this benchmark sends token ids")


def stream_one(port, prompt, new):
    """(time to first token, [inter-token gaps], tokens) of one streaming completion request."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": new, "temperature": 0,
                                                     "stream": True}).encode(),
              {"Content-Type": "application/json"})
    r = c.getresponse()
    arrivals, tokens = [], 0
    for line in r:
        if line.startswith(b"data: {"):  # one chunk per generated token (this tokenizer holds no text back)
            arrivals.append(time.perf_counter())
            tokens += 1
    c.close()
    return arrivals[0] - t0, list(np.diff(arrivals)), tokens


def clients(port, prompts, new, concurrency):
    """Runs the prompts with `concurrency` clients at a time; returns (wall s, tokens, ttfts, itls)."""
    results, lock, queue = [], threading.Lock(), list(enumerate(prompts))

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                _, p = queue.pop(0)
            out = stream_one(port, p, new)
            with lock:
                results.append(out)

    t = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    wall = time.perf_counter() - t
    return wall, sum(r[2] for r in results), [r[0] for r in results], [g for r in results for g in r[1]]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["stories15M", "stories110M"])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=16)
    add_malloc_flag(p)
    args = p.parse_args()
    malloc = set_malloc(args)
    import uvicorn

    print(f"machine: {machine()}; {malloc}; jax {jax.__version__}")
    rows = []
    for preset in args.presets:
        config = lj.load_model_config(Path(__file__).resolve().parents[1] / "configs" / f"{preset}.yaml")
        # stories15M's 256-token context cannot hold a 256-token prompt and 128 new tokens: its shape, with room
        config = config.replace(dtype="float32", max_seq_len=max(config.max_seq_len, 256 + args.new_tokens))
        params = lj.init_params(config, jax.random.key(0))
        rng = np.random.default_rng(0)
        prompts = [[1, *map(int, rng.integers(3, config.vocab_size, int(n) - 1))]
                   for n in rng.integers(16, 257, args.requests)]
        new = args.new_tokens
        ms = lambda s: f"{1000 * s:.0f}"

        # (a) one after another with lj.generate (compiled first for every prompt length bucket)
        for q in prompts:
            lj.generate(params, config, [q], max_new_tokens=new, temperature=0.0)
        t = time.perf_counter()
        for q in prompts:
            lj.generate(params, config, [q], max_new_tokens=new, temperature=0.0)
        seq_s = time.perf_counter() - t
        # (b) the 16 as one static batch
        lj.generate(params, config, prompts, max_new_tokens=new, temperature=0.0)
        t = time.perf_counter()
        lj.generate(params, config, prompts, max_new_tokens=new, temperature=0.0)
        static_s = time.perf_counter() - t
        n_tokens = len(prompts) * new
        static_step = static_s / new
        rows.append([preset, "lj.generate, one after another", 1, f"{n_tokens / seq_s:,.1f}", "", "", "", "", ""])
        rows.append([preset, "lj.generate, static batch of 16", 16, f"{n_tokens / static_s:,.1f}", "", "", "",
                     ms(static_step), ""])
        print(rows[-2:], flush=True)

        engine = Engine(params, config, _NoText(), max_batch=16, max_len=256 + args.new_tokens)
        t = time.perf_counter()
        engine.start()
        warm = time.perf_counter() - t
        server = Server(engine, preset, None)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning"))
        th = threading.Thread(target=uv.run, daemon=True)
        th.start()
        while not uv.started:
            time.sleep(0.05)
        stream_one(port, prompts[0], 4)  # the HTTP path once
        for concurrency in (1, 4, 16):
            # two requests per client: enough for the rates and percentiles, and 1 client stays minutes long
            wall, tokens, ttft, itl = clients(port, prompts[:2 * concurrency], new, concurrency)
            rate = tokens / wall
            rows.append([preset, f"serve.py, {concurrency} streaming clients", concurrency, f"{rate:,.1f}",
                         f"{rate / (n_tokens / static_s):.0%}", ms(np.percentile(ttft, 50)),
                         ms(np.percentile(ttft, 95)), f"{ms(np.percentile(itl, 50))} / {ms(np.percentile(itl, 95))}",
                         f"{np.percentile(itl, 95) / static_step:.2f}x"])
            print(rows[-1], flush=True)
        compiles = engine.compilations_after_warm_up()
        uv.should_exit = True
        th.join()
        engine.stop(drain=False)
        print(f"{preset}: warm-up {warm:.0f} s; compilations after warm-up: {compiles}", flush=True)
        rows.append([preset, f"(warm-up {warm:.0f} s; compilations after it: {compiles})", "", "", "", "", "", "", ""])
    print(table(f"Serving (CPU, float32, random weights; {args.requests} requests, prompts 16-256 tokens, "
                f"{args.new_tokens} new tokens, greedy)",
                ["preset", "how", "concurrency", "generated tok/s", "of static batch", "TTFT p50 ms",
                 "TTFT p95 ms", "ITL p50 / p95 ms (static: step ms)", "ITL p95 / static step"], rows))


if __name__ == "__main__":
    main()
