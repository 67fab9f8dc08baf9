"""Continuous batching: many generation requests share one compiled decode step. No HTTP here (see api.py).

A fixed pool of `max_batch` slots, one KV-cache row each; every shape is static, so once `warm_up` has compiled
the decode step (one per power of two of slots) and the prefill chunks (a few shapes), no request triggers a
compilation. One thread owns the model. Each turn of its loop it admits waiting requests (from a bounded queue)
into free slots, prefills those whose prompts fit one chunk and one chunk of the earliest longer prompt, then
advances every decoding slot by one token: a long prompt arriving slows the running streams by one chunk per token
instead of stopping them for its whole prefill. A prompt that begins with tokens whose keys/values a slot still
holds (the earlier turns of a conversation, a shared system prompt) starts after them. A finished or cancelled
request frees its slot at once; the slot keeps its keys/values until a new request needs it (the least recently
used first).

The compiled functions over the slots, with the per-slot sampling settings, are slots.py's; this module schedules
them. Text is detokenized per request (UTF-8 safe) and stop strings are matched on it as it grows, the text cut
before them.

    engine = Engine(ckpt.params, ckpt.config, ckpt.tokenizer, stop_tokens=ckpt.stop_tokens, max_batch=16)
    engine.start()                      # compiles, then serves from its own thread
    result = engine.generate(Request(prompt=ids, max_tokens=50, temperature=0.0))
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import model, sampling
from llama_jax.config import ModelConfig
from llama_jax.errors import ArgumentError
from llama_jax.score import token_logprobs
from llama_jax.serve import slots
from llama_jax.serve.placement import place, rows_for
from llama_jax.serve.requests import Event, Request, find_stop, partial_stop
from llama_jax.serve.slots import TOP_LOGPROBS
from llama_jax.text.tokenizer import TextStream

BURST, BURST_S = 8, 0.05  # steps a call for a request alone, if they take at most this many seconds


class EngineStopping(RuntimeError):
    """The engine is stopping and takes no new requests."""


class QueueFull(RuntimeError):
    """The waiting queue is full: try again later (the server answers 429 with Retry-After)."""


@dataclasses.dataclass
class _Active:
    """A request holding a slot: first its prompt is prefilled a chunk at a time, then it decodes."""

    request: Request
    slot: int
    text: TextStream
    held: str = ""  # text not yet emitted: it may begin a stop string
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated so far
    started: float = 0.0
    prefilled: int = 0  # prompt tokens whose keys/values are in the slot (reused or prefilled)
    prompt_logprobs: list | None = None  # echo: sent with the first token
    order: int = 0  # admission order: prompts are prefilled first come, first served

    @property
    def generated(self) -> int:
        return len(self.tokens)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt)

    def known(self) -> list[int]:
        """The tokens whose keys/values are in the slot's first positions: the prompt as far as prefilled, then
        every generated token but the newest (which is fed by the next step)."""
        r = self.request
        return r.prompt + self.tokens[:-1] if self.decoding else r.prompt[:self.prefilled]


class Engine:
    def __init__(self, params, config: ModelConfig, tokenizer, *, stop_tokens=(), max_batch: int = 16,
                 max_len: int | None = None, queue_size: int = 256, prefill_chunk: int = 256,
                 interleave: bool = True, prefix_reuse: bool = True, log: Callable[[str], None] | None = None):
        """`max_len`: tokens per slot (prompt + generation), at most the model's context (default). A prompt
        must leave room for at least one new token.

        `prefill_chunk`: a prompt of at most this many tokens (past what a slot already holds) is prefilled in
        one piece between two decode steps, a longer one in chunks (the shapes are 16, 64, 256, ... up to it).
        `interleave`: while other requests decode, a longer prompt's chunk is no longer than one of their decode
        steps (timed at warm-up), so it at most doubles their inter-token latency; without, chunks of
        `prefill_chunk`. `prefix_reuse`: a prompt starting with tokens whose keys/values a slot still holds (a
        finished conversation's, a running request's) starts after them instead of prefilling them again."""
        model.check_params(params, config)
        self.config, self.tokenizer = config, tokenizer
        self.max_batch, self.max_len = int(max_batch), int(min(max_len or config.max_seq_len, config.max_seq_len))
        self.stop_tokens = frozenset(int(t) for t in stop_tokens)
        self.queue_size = queue_size
        if prefill_chunk < 1:
            raise ArgumentError(f"prefill_chunk={prefill_chunk} must be >= 1", "prefill_chunk")
        chunk = min(int(prefill_chunk), self.max_len)
        self.chunk_sizes = tuple(sorted({16 * 4 ** i for i in range(12) if 16 * 4 ** i < chunk} | {chunk}))
        self.interleave, self.prefix_reuse = interleave, prefix_reuse
        # echo scores the whole prompt in one piece: padded to a power of two (at least 16) or to max_len
        powers = (2 ** i for i in range(4, 32))
        self.buckets = tuple(sorted({min(n, self.max_len) for n in powers if n // 2 < self.max_len} | {self.max_len}))
        self.log = log
        self.params = model.unstack_layers(params, config.dtype)
        self.score_params = jax.tree.map(jnp.asarray, params)
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: dict[int, _Active] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self._draining = False
        self._seeds = itertools.count(int(time.time_ns() % (1 << 31)))
        self.ready = False
        self.steps = 0
        self._pool = slots.empty_pool(self.config, self.max_batch, self.max_len)
        self._inflight = None  # (outputs of the step in flight, the slots' owners when it was launched)
        # One decode step per power of two up to the pool (and the pool itself): a step runs the smallest that
        # covers the highest occupied slot, and slots are handed out lowest first, so one client pays a one-row
        # step and sixteen pay what a full pool does.
        self.step_sizes = tuple(sorted({min(2 ** i, self.max_batch) for i in range(self.max_batch.bit_length() + 1)}))
        self.steps_by_size = dict.fromkeys(self.step_sizes, 0)
        self._steps = {n: jax.jit(functools.partial(slots.decode_steps, config=config, rows=n), donate_argnums=1)
                       for n in self.step_sizes}
        # A request alone with nothing waiting runs BURST steps a call, where BURST of its steps take no longer than
        # BURST_S (timed at warm-up): a new request then waits at most that long for its prefill.
        self._burst = jax.jit(functools.partial(slots.decode_steps, config=config, rows=1, steps=BURST),
                              donate_argnums=1)
        self.burst = 1  # steps per call for a request alone, set by warm_up
        self._chunk = jax.jit(functools.partial(slots.prefill_chunk, config=config), donate_argnums=1)
        self._begin = {copy: jax.jit(functools.partial(slots.begin, copy=copy), donate_argnums=0)
                       for copy in (False, True)}
        self.chunks_by_size = dict.fromkeys(self.chunk_sizes, 0)
        self._kept: dict[int, list[int]] = {}  # free slots: the tokens whose keys/values they still hold
        self._used: dict[int, int] = {}  # slot -> when its last request ended (least recently used reused first)
        self._clock = itertools.count()
        self._order = itertools.count()
        self.prefix_hits = self.reused_tokens = self.prompt_tokens = 0
        self._step_s: dict[int, float] = {}  # warm-up timings: a decode step of each size,
        self._chunk_s: dict[int, float] = {}  # and a prefill chunk of each shape

    # --- public API -------------------------------------------------------------------------------------------

    def start(self, warm_up: bool = True) -> None:
        """Compiles (unless warm_up=False) and starts the engine's thread."""
        if warm_up:
            self.warm_up()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="llama_jax-engine", daemon=True)
        self._thread.start()

    def warm_up(self) -> None:
        """Compiles (by running them once on dummy input) the decode steps, the prefill chunks and the scoring
        buckets, and times the steps and chunks (which chunk fits beside which step)."""
        s = self._pool
        for P in self.buckets:  # compiled, not run: running the longest on a long context costs more than compiling
            token_logprobs.lower(self.score_params, np.zeros((1, P), np.int32), self.config, np.ones(1, np.int32),
                                 top=TOP_LOGPROBS).compile()
        prompt = np.zeros((1, self.max_len), np.int32)
        for copy in (False, True):
            s = self._begin[copy](s, 0, 1 % self.max_batch, prompt, 1, 0, self._settings(Request([0], 1)))

        def timed(run, s):  # the better of two runs after the compiling one
            times = []
            for _ in range(3):
                t = time.perf_counter()
                s = run(s)
                jax.block_until_ready(s.lengths_B)
                times.append(time.perf_counter() - t)
            return s, min(times[1:])
        for C in self.chunk_sizes:
            tokens = np.zeros((1, C), np.int32)
            s, self._chunk_s[C] = timed(lambda s: self._chunk(self.params, slots.deactivate(s, 0), tokens, 1, 0,
                                                              np.bool_(True), np.bool_(True))[0], s)
        for n, step in self._steps.items():
            s = step(self.params, s, np.bool_(True))[0]
            s, self._step_s[n] = timed(lambda s: step(self.params, s, np.bool_(False))[0], s)
        s = self._burst(self.params, s, np.bool_(True))[0]
        s, burst_s = timed(lambda s: self._burst(self.params, s, np.bool_(False))[0], s)
        self.burst = BURST if burst_s <= BURST_S else 1
        jax.block_until_ready(slots.deactivate(s, 0).lengths_B)
        self._pool = slots.empty_pool(self.config, self.max_batch, self.max_len)
        # Then requests of each kind through the real path: XLA:CPU prepares some kernels on their first run (a
        # branch first taken by a user's request cost seconds), and every branch of the step runs here once.
        log, self.log = self.log, None
        prompt = [0] * max(1, min(3, self.max_len - 1))  # leaves room for a new token in any --max-len
        for r in (Request(prompt, 4, temperature=0.0),
                  Request(prompt, 4, temperature=1.0, top_p=0.9, top_k=5, min_p=0.01, repetition_penalty=1.1,
                          logprobs=2, seed=0)):
            self._admit(r)
            while self._active or self._inflight is not None:
                self._prefill_next()
                self._decode()
        self.log, self.steps = log, 0
        self.steps_by_size = dict.fromkeys(self.step_sizes, 0)
        self.chunks_by_size = dict.fromkeys(self.chunk_sizes, 0)
        self.prefix_hits = self.reused_tokens = self.prompt_tokens = 0
        self._kept.clear()
        self._compiles_at_ready = _compile_count()
        self.ready = True

    def submit(self, request: Request) -> None:
        """Queues a request (checked here: an ArgumentError naming the request field if it cannot run); QueueFull
        if the queue is full, EngineStopping if the engine is stopping."""
        self._check(request)
        with self._lock:
            if not self._running or self._draining:
                raise EngineStopping("the engine is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the queue holds {self.queue_size})")
            if request.seed is None:
                request.seed = next(self._seeds) % (1 << 31)
            self._waiting.append(request)
            self._lock.notify()

    def cancel(self, request_id: str) -> None:
        """Cancels a waiting or running request (a client that went away): its slot is free for the next step."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify()

    def generate(self, request: Request, timeout: float | None = None) -> Event:
        """Submits a request and waits for it: one Event with all its text, tokens and log-probabilities."""
        import queue

        events: queue.Queue = queue.Queue()
        request.emit = events.put
        self.submit(request)
        total = Event()
        while True:
            e = events.get(timeout=timeout)
            total.extend(e)
            if e.finish_reason:
                return total

    def stats(self) -> dict:
        with self._lock:
            prefilling = sum(not a.decoding for a in self._active.values())
            return {"ready": self.ready, "slots": self.max_batch, "active": len(self._active) - prefilling,
                    "prefilling": prefilling, "waiting": len(self._waiting), "steps": self.steps,
                    "steps_by_batch_size": {str(n): c for n, c in self.steps_by_size.items()},
                    "prefill_chunks_by_size": {str(n): c for n, c in self.chunks_by_size.items()},
                    "prefix_cache": {"hits": self.prefix_hits, "reused_tokens": self.reused_tokens,
                                     "prompt_tokens": self.prompt_tokens},
                    "compilations_after_warm_up": self.compilations_after_warm_up()}

    def compilations_after_warm_up(self) -> int:
        return _compile_count() - self._compiles_at_ready if self.ready else 0

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops taking requests; with drain, lets the running and waiting ones finish, else cancels them."""
        with self._lock:
            self._draining = True
            if not drain:
                self._cancelled.update(r.id for r in self._waiting)
                self._cancelled.update(a.request.id for a in self._active.values())
            self._lock.notify()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread is not None and self._thread.is_alive():
            with self._lock:
                if not self._waiting and not self._active:
                    self._running = False
                    self._lock.notify()
            self._thread.join(0.05)
            if deadline is not None and time.monotonic() > deadline:
                break
        self._running = False

    # --- checks -------------------------------------------------------------------------------------------------

    def _check(self, r: Request) -> None:
        if not r.prompt:
            raise ArgumentError("prompt: empty (it needs at least one token)", "prompt")
        bad = [t for t in r.prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ArgumentError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})",
                                "prompt")
        room = self.max_len - len(r.prompt)
        if room < (1 if r.max_tokens > 0 else 0) or len(r.prompt) > self.max_len:
            raise ArgumentError(f"prompt: {len(r.prompt)} tokens leave no room for new ones in the context of "
                                f"{self.max_len} tokens", "prompt")
        if r.max_tokens < 0:
            raise ArgumentError(f"max_tokens={r.max_tokens} must be >= 0", "max_tokens")
        if r.max_tokens == 0 and not r.echo:
            raise ArgumentError("max_tokens=0 generates nothing; it is only useful with echo", "max_tokens")
        if r.logprobs is not None and not 0 <= r.logprobs <= TOP_LOGPROBS:
            raise ArgumentError(f"logprobs={r.logprobs} must be in [0, {TOP_LOGPROBS}]", "logprobs")
        sampling.check_sampling_args(r.temperature, r.top_k or None, r.top_p, r.min_p, r.repetition_penalty)

    # --- the engine's thread ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while (self._running and not self._waiting and not self._active and not self._cancelled
                       and self._inflight is None):
                    self._lock.wait()
                if not self._running:
                    break
                cancelled, self._cancelled = self._cancelled, set()
                waiting = []
                while self._waiting and len(waiting) + len(self._active) < self.max_batch:
                    waiting.append(self._waiting.popleft())
                kept = collections.deque(r for r in self._waiting if r.id not in cancelled)
                dropped = [r for r in self._waiting if r.id in cancelled]
                self._waiting = kept
            for r in dropped:
                r.emit(Event(finish_reason="cancelled"))
                self._log(r, 0, time.monotonic(), "cancelled while waiting")
            for a in list(self._active.values()):
                if a.request.id in cancelled:
                    self._finish(a, "cancelled")
            for r in waiting:
                if r.id in cancelled:
                    r.emit(Event(finish_reason="cancelled"))
                    continue
                try:
                    self._admit(r)
                except Exception as e:  # a bug must not stop the engine for everyone else
                    for slot in [s for s, a in self._active.items() if a.request is r]:
                        del self._active[slot]
                    r.emit(Event(finish_reason="error", error=f"{type(e).__name__}: {e}"))
            try:
                self._prefill_next()
                self._decode()
            except Exception as e:
                self._inflight = None
                for a in list(self._active.values()):
                    self._finish(a, "error", error=f"{type(e).__name__}: {e}")
                self._pool = slots.empty_pool(self.config, self.max_batch, self.max_len)
                self._kept.clear()
        if self._inflight is not None:  # stopping: what the last step produced still goes out
            self._process(*self._inflight)

    def _admit(self, r: Request) -> None:
        prompt_lp = self._score_prompt(r.prompt, r.logprobs or 0) if r.echo else None
        if r.max_tokens == 0:
            r.emit(Event(prompt_logprobs=prompt_lp, finish_reason="length"))
            self._log(r, 0, time.monotonic())
            return
        held = {s: a.known() for s, a in self._active.items()} | self._kept
        slot, source, reused = place(r.prompt, held, set(self._active), self._used, self.max_batch, self.step_sizes,
                                     self.prefix_reuse)
        self._kept.pop(slot, None)
        a = _Active(r, slot, TextStream(self.tokenizer, context=r.prompt[-8:]), started=time.monotonic(),
                    prefilled=reused, prompt_logprobs=prompt_lp, order=next(self._order))
        self._active[slot] = a
        prompt = np.zeros((1, self.max_len), np.int32)
        prompt[0, :len(r.prompt)] = r.prompt
        self._pool = self._begin[source != slot](self._pool, slot, source, prompt, len(r.prompt), reused,
                                                 self._settings(r))
        self.prompt_tokens += len(r.prompt)
        self.prefix_hits += reused > 0
        self.reused_tokens += reused

    def chunk_beside(self, rows: int) -> int:
        """The largest prefill chunk that took no longer than a decode step of `rows` rows at warm-up (at least the
        smallest chunk): what one step's prefill may cost while others decode."""
        if not self._step_s:  # not warmed up
            return self.chunk_sizes[0]
        return max([c for c in self.chunk_sizes if self._chunk_s[c] <= self._step_s[rows]],
                   default=self.chunk_sizes[0])

    def _prefill_next(self) -> None:
        """Between two decode steps: prefills every waiting prompt that fits one chunk (a chat's next turn, most
        prompts), then the next chunk of the earliest longer one. While others decode (and with `interleave`),
        that chunk is the largest shape that took no longer than their decode step at warm-up (at least the
        smallest), so a long prompt slows them by at most one step per step. A prompt's last chunk gives its
        request the first token."""
        waiting = sorted((a for a in self._active.values() if not a.decoding), key=lambda a: a.order)
        for a in [a for a in waiting if len(a.request.prompt) - a.prefilled <= self.chunk_sizes[-1]]:
            self._prefill_chunk(a, self.chunk_sizes[-1])
        longer = [a for a in waiting if not a.decoding]
        if longer:
            decoding = [s for s, b in self._active.items() if b.decoding]
            beside = decoding and self.interleave
            self._prefill_chunk(longer[0], self.chunk_beside(rows_for(decoding, self.step_sizes)) if beside
                                else self.chunk_sizes[-1])

    def _prefill_chunk(self, a: _Active, limit: int) -> None:
        """Runs the next chunk of a's prompt: the smallest shape that holds the rest, at most `limit`."""
        r, left = a.request, len(a.request.prompt) - a.prefilled
        C = min(next((c for c in self.chunk_sizes if c >= left), limit), limit)
        n = min(left, C)
        tokens = np.zeros((1, C), np.int32)
        tokens[0, :n] = r.prompt[a.prefilled:a.prefilled + n]
        last = a.prefilled + n == len(r.prompt)
        self._pool, token, lp, top_ids, top_lp = self._chunk(self.params, self._pool, tokens, n, a.slot,
                                                             np.bool_(last), np.bool_(r.logprobs is not None))
        a.prefilled += n
        self.chunks_by_size[C] += 1
        if last:
            if a.prompt_logprobs is not None:
                r.emit(Event(prompt_logprobs=a.prompt_logprobs))
            self._take(a, int(token), float(lp), top_ids, top_lp)

    def _decode(self) -> None:
        """Launches the next step, then hands out what the previous one produced while this one computes (JAX
        dispatches asynchronously): the host's work per token overlaps the device's. A request that the previous
        step finishes has had one more token computed by this one; it is dropped (the slot's owner at launch is
        recorded, so a slot freed and refilled meanwhile never receives its old occupant's token)."""
        previous, self._inflight = self._inflight, None
        decoding = {s: a for s, a in self._active.items() if a.decoding}
        if decoding:
            want = any(a.request.logprobs is not None for a in decoding.values())
            rows = rows_for(decoding, self.step_sizes)
            alone = rows == 1 and len(self._active) == 1 and not self._waiting and self.burst > 1
            step, n = (self._burst, self.burst) if alone else (self._steps[rows], 1)
            self._pool, out = step(self.params, self._pool, np.bool_(want))
            self.steps += n
            self.steps_by_size[rows] += n
            self._inflight = (out, decoding)
        if previous is not None:
            self._process(*previous)

    def _process(self, out, owners: dict) -> None:
        tokens, lps, top_ids, top_lps = jax.device_get(out)  # [steps, rows, ...]
        for i in range(tokens.shape[0]):
            for slot, a in owners.items():
                if self._active.get(slot) is a:  # (a request that ends mid-burst takes no more of its tokens)
                    self._take(a, int(tokens[i, slot]), float(lps[i, slot]), top_ids[i, slot], top_lps[i, slot])

    def _take(self, a: _Active, token: int, lp: float, top_ids, top_lps) -> None:
        """A slot's new token: emit its text (minus what may start a stop string) and finish if it ends the
        request."""
        r = a.request
        a.tokens.append(token)
        top = ([(int(i), float(v)) for i, v in zip(np.asarray(top_ids)[:r.logprobs], np.asarray(top_lps))]
               if r.logprobs else [])
        event = Event(tokens=[token], logprobs=[lp] if r.logprobs is not None else [],
                      top_logprobs=[top] if r.logprobs is not None else [])
        if token in self.stop_tokens:
            event.text = a.held + a.text.flush()
            event.finish_reason = "stop"
            return self._finish(a, None, event)
        a.held += a.text.add(token)
        cut = find_stop(a.held, r.stop)
        if cut is not None:
            event.text, a.held = a.held[:cut], ""
            event.finish_reason = "stop"
            return self._finish(a, None, event)
        full = len(r.prompt) + a.generated >= self.max_len
        if a.generated >= r.max_tokens or full:
            event.text = a.held + a.text.flush()
            cut = find_stop(event.text, r.stop)
            event.text = event.text if cut is None else event.text[:cut]
            event.finish_reason = "length" if cut is None else "stop"
            return self._finish(a, None, event)
        keep = partial_stop(a.held, r.stop)
        event.text, a.held = a.held[:len(a.held) - keep], a.held[len(a.held) - keep:]
        r.emit(event)

    def _finish(self, a: _Active, reason: str | None, event: Event | None = None, error: str | None = None):
        if self._active.get(a.slot) is a:
            del self._active[a.slot]
            self._kept[a.slot] = a.known()
            self._used[a.slot] = next(self._clock)
        self._pool = slots.deactivate(self._pool, a.slot)
        event = event or Event(finish_reason=reason, error=error)
        a.request.emit(event)
        self._log(a.request, a.generated, a.started, event.finish_reason)

    def _log(self, r: Request, generated: int, started: float, how: str | None = None) -> None:
        if self.log is not None:
            self.log(f"request {r.id or '-'}: {len(r.prompt)} prompt tokens, {generated} generated, "
                     f"{(time.monotonic() - started) * 1000:.0f} ms" + (f", {how}" if how else ""))

    def _score_prompt(self, prompt: list[int], top: int):
        T = next(b for b in self.buckets if b >= len(prompt))
        tokens = np.zeros((1, T), np.int32)
        tokens[0, :len(prompt)] = prompt
        out = jax.device_get(token_logprobs(self.score_params, tokens, self.config,
                                            np.array([len(prompt)], np.int32), top=TOP_LOGPROBS))
        lps, ids, tlps = out["logprobs"][0], out["top_ids"][0], out["top_logprobs"][0]
        return [(t, None if i == 0 else float(lps[i]),
                 [] if i == 0 else [(int(a), float(b)) for a, b in zip(ids[i][:top], tlps[i][:top])])
                for i, t in enumerate(prompt)]

    def _settings(self, r: Request) -> slots.SlotSampling:
        return slots.SlotSampling(temperature=np.float32(r.temperature), top_k=np.int32(r.top_k or 0),
                                  top_p=np.float32(1.0 if r.top_p is None else r.top_p),
                                  min_p=np.float32(r.min_p or 0.0), penalty=np.float32(r.repetition_penalty or 1.0),
                                  seed=np.uint32(r.seed or 0))


def _compile_count() -> int:
    """Compilations so far in this process (XLA backend compiles, counted by JAX's monitoring events)."""
    return _COMPILES[0]


_COMPILES = [0]


def _count_compile(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)
