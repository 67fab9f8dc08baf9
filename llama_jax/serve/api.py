"""The OpenAI-compatible HTTP layer (a Starlette app, served by uvicorn: cli/serve.py) over the continuous-batching
engine (engine.py).

    python serve.py --checkpoint runs/tiny          # then: curl http://127.0.0.1:8000/v1/completions ...

Routes: GET / (the playground page, playground.html), GET /health, GET /v1/models, POST /v1/completions,
POST /v1/chat/completions; streaming as server-sent events ending with `data: [DONE]`. Requests are checked
field by field (protocol.py): a bad one gets OpenAI's error object (400 naming the parameter, 404 for an unknown
model, 429 with Retry-After when the queue is full) and the server keeps serving. A client that disconnects
cancels its request, which frees its slot.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from llama_jax.errors import ArgumentError
from llama_jax.serve import protocol as req
from llama_jax.serve.engine import TOP_LOGPROBS, Engine, EngineStopping, QueueFull
from llama_jax.serve.protocol import MAX_BODY, MAX_N, BadRequest, sampling_fields
from llama_jax.serve.requests import Event, Request
from llama_jax.text import chat_template as chat

# OpenAI's chat roles ("function", its deprecated one, aside); the chat template decides what it does with each.
ROLES = ("system", "developer", "user", "assistant", "tool")


def error_response(e: BadRequest, headers: dict | None = None) -> JSONResponse:
    kind = {404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable"}.get(e.status,
                                                                                              "invalid_request_error")
    return JSONResponse({"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}},
                        status_code=e.status, headers=headers)


# --- the app ----------------------------------------------------------------------------------------------------

class Server:
    def __init__(self, engine: Engine, model_name: str, chat_template: str | None, retry_after: int = 1):
        self.engine, self.model_name, self.template = engine, model_name, chat_template
        self.tok = engine.tokenizer
        self.retry_after = retry_after
        self.created = int(time.time())
        self.page = importlib.resources.files("llama_jax.serve").joinpath("playground.html").read_text("utf-8")
        self.app = Starlette(routes=[
            Route("/", self.playground, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ], exception_handlers={404: self.not_found, 405: self.not_allowed, 500: self.internal_error})

    async def not_found(self, request, exc):
        return self._refuse(BadRequest(f"no route {request.url.path}", status=404))

    async def not_allowed(self, request, exc):
        return self._refuse(BadRequest(f"{request.method} is not allowed on {request.url.path}", status=405))

    async def internal_error(self, request, exc):
        return self._refuse(BadRequest(f"internal error: {type(exc).__name__}: {exc}", status=500))

    async def playground(self, request):
        return HTMLResponse(self.page)

    async def health(self, request):
        stats = self.engine.stats()
        return JSONResponse({"status": "ok" if stats["ready"] else "warming up", "model": self.model_name, **stats},
                            status_code=200 if stats["ready"] else 503)

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llama_jax",
             "max_model_len": self.engine.max_len}]})

    async def _body(self, request: HTTPRequest, kind: str) -> dict:
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > MAX_BODY:  # refused before reading it
            raise BadRequest(f"the request body is {declared} bytes; at most {MAX_BODY}", status=413)
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise BadRequest(f"the request body is {len(raw)} bytes; at most {MAX_BODY}", status=413)
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise BadRequest(f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        req.check_fields(body, kind)
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise BadRequest(f"the model {model!r} does not exist (this server has {self.model_name!r})", "model",
                             status=404, code="model_not_found")
        return body

    # --- completions --------------------------------------------------------------------------------------------

    async def completions(self, request: HTTPRequest):
        try:
            body = await self._body(request, "completions")
            prompts = self._prompts(body.get("prompt"))
            n = req.integer(body, "n", 1, 1, MAX_N)
            echo = req.boolean(body, "echo")
            logprobs = req.integer(body, "logprobs", None, 0, TOP_LOGPROBS)
            max_tokens = req.integer(body, "max_tokens", 16, 0)
            stream = req.boolean(body, "stream")
            if stream and echo and max_tokens == 0:
                raise BadRequest("echo with max_tokens 0 and stream is not supported; do not stream it", "stream")
            if max_tokens == 0 and not echo:
                raise BadRequest("max_tokens=0 generates nothing (it is only useful with echo)", "max_tokens")
            fields = sampling_fields(body)
            jobs = [self._request(ids, max_tokens, fields, logprobs, echo, i * n + j, n)
                    for i, (ids, _) in enumerate(prompts) for j in range(n)]
        except BadRequest as e:
            return self._refuse(e)
        rid = "cmpl-" + uuid.uuid4().hex[:24]
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        texts = {job.index: prompts[job.index // n][1] for job in jobs}

        def choices(results):
            return [{"index": job.index, "text": (texts[job.index] if echo else "") + total.text,
                     "logprobs": None if logprobs is None else self._completion_logprobs(total, echo),
                     "finish_reason": total.finish_reason} for job, total in zip(jobs, results)]

        return await self._answer(request, body, jobs, stream, head, head, self._completion_chunk, choices)

    def _prompts(self, prompt) -> list[tuple[list[int], str]]:
        """(ids, text) per prompt: a string, a list of strings, a list of token ids or a list of such lists."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise BadRequest("prompt must be a string, a list of strings or token ids (non-empty)", "prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append((self.tok.encode(p, bos=True), p))
            elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                bad = [t for t in p if not 0 <= t < self.engine.config.vocab_size]
                if bad:
                    raise BadRequest(f"prompt: token id {bad[0]} is outside the vocabulary "
                                     f"[0, {self.engine.config.vocab_size})", "prompt")
                out.append((list(p), self.tok.decode(p)))
            else:
                raise BadRequest("prompt must be a string, a list of strings or token ids (non-empty)", "prompt")
        return out

    def _request(self, ids, max_tokens, fields, logprobs, echo, index, n) -> _Job:
        room = self.engine.max_len - len(ids)
        if room < (1 if max_tokens else 0):
            raise BadRequest(f"the prompt has {len(ids)} tokens; the context holds {self.engine.max_len}, so at "
                             "most " + str(self.engine.max_len - 1) + " leave room to generate", "prompt",
                             code="context_length_exceeded")
        if max_tokens > room:  # as OpenAI answers, rather than cutting the answer short unasked
            raise BadRequest(f"the context holds {self.engine.max_len} tokens, but {len(ids) + max_tokens} were asked "
                             f"for ({len(ids)} in the prompt, max_tokens={max_tokens} for the completion); ask for at "
                             f"most {room}", "max_tokens", code="context_length_exceeded")
        seed = fields["seed"]
        if seed is not None:  # n choices from one seed: each its own stream, all reproducible
            seed = (seed * MAX_N + index % n) % (1 << 31)
        r = Request(prompt=ids, max_tokens=max_tokens, temperature=fields["temperature"],
                    top_p=fields["top_p"], top_k=fields["top_k"], min_p=fields["min_p"],
                    repetition_penalty=fields["repetition_penalty"], seed=seed, stop=fields["stop"],
                    logprobs=logprobs, echo=echo, id=uuid.uuid4().hex[:12])
        return _Job(index, r)

    def _completion_chunk(self, job, e: Event) -> dict:
        lp = None
        if job.request.logprobs is not None and e.tokens:
            lp = {"tokens": [self._token(t) for t in e.tokens], "token_logprobs": e.logprobs,
                  "top_logprobs": [self._top(top) for top in e.top_logprobs],
                  "text_offset": [0] * len(e.tokens)}
        return {"index": job.index, "text": e.text, "logprobs": lp, "finish_reason": e.finish_reason}

    def _completion_logprobs(self, total: Event, echo: bool) -> dict:
        tokens, lps, tops = [], [], []
        if echo and total.prompt_logprobs is not None:
            for t, lp, top in total.prompt_logprobs:
                tokens.append(t)
                lps.append(lp)
                tops.append(None if lp is None else self._top(top))
        tokens += total.tokens
        lps += total.logprobs
        tops += [self._top(top) for top in total.top_logprobs]
        strings = [self._token(t) for t in tokens]
        offsets, at = [], 0
        for s in strings:
            offsets.append(at)
            at += len(s)
        return {"tokens": strings, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _top(self, top) -> dict:
        """Alternatives as the completions API gives them, a dict by text: of tokens with the same text (byte
        pieces, padded rows), the most likely one."""
        out = {}
        for token, logprob in top:
            out.setdefault(self._token(token), logprob)
        return out

    def _token(self, token: int) -> str:
        """A token as text: its piece for a special token (<s>, <|eot_id|>), else its decoded text ("" for the
        model's rows past the tokenizer's vocabulary)."""
        if not 0 <= token < self.tok.vocab_size:
            return ""
        return self.tok.piece(token) if self.tok.is_special(token) else self.tok.decode([token])

    # --- chat ---------------------------------------------------------------------------------------------------

    async def chat_completions(self, request: HTTPRequest):
        try:
            body = await self._body(request, "chat")
            if self.template is None:
                raise BadRequest(f"the model {self.model_name!r} has no chat template; use /v1/completions",
                                 "messages")
            messages = self._messages(body.get("messages"))
            try:
                ids = chat.encode_conversation(self.tok, self.template, messages, add_generation_prompt=True)
            except chat.ChatTemplateError as e:
                raise BadRequest(str(e), "messages") from None
            n = req.integer(body, "n", 1, 1, MAX_N)
            want = req.boolean(body, "logprobs")
            top = req.integer(body, "top_logprobs", None, 0, TOP_LOGPROBS)
            if top is not None and not want:
                raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
            limit = req.integer(body, "max_completion_tokens", None, 1)
            limit = req.integer(body, "max_tokens", limit, 1)
            room = self.engine.max_len - len(ids)
            fields = sampling_fields(body)
            jobs = [self._request(ids, room if limit is None else limit, fields, (top or 0) if want else None,
                                  False, j, n) for j in range(n)]
            stream = req.boolean(body, "stream")
        except BadRequest as e:
            return self._refuse(e)
        rid = "chatcmpl-" + uuid.uuid4().hex[:24]
        head = {"id": rid, "created": int(time.time()), "model": self.model_name}

        def choices(results):
            return [{"index": job.index, "message": {"role": "assistant", "content": total.text},
                     "logprobs": self._chat_logprobs(total) if want else None, "finish_reason": total.finish_reason}
                    for job, total in zip(jobs, results)]

        return await self._answer(request, body, jobs, stream, {**head, "object": "chat.completion"},
                                  {**head, "object": "chat.completion.chunk"}, self._chat_chunk, choices,
                                  first=self._chat_first)

    def _messages(self, messages) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequest(f"messages[{i}] must be an object with a role and a content", "messages")
            if m["role"] not in ROLES:
                raise BadRequest(f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}", "messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: only text
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise BadRequest(f"messages[{i}].content must be a string", "messages")
            out.append({"role": m["role"], "content": content})
        return out

    def _chat_first(self, job) -> dict:
        return {"index": job.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def _chat_chunk(self, job, e: Event) -> dict:
        lp = self._chat_logprobs(e) if job.request.logprobs is not None and e.tokens else None
        delta = {"content": e.text} if e.text or not e.finish_reason else {}
        return {"index": job.index, "delta": delta, "logprobs": lp, "finish_reason": e.finish_reason}

    def _chat_logprobs(self, e: Event) -> dict:
        entry = lambda t, v: {"token": self._token(t), "logprob": v, "bytes": list(self._token(t).encode())}
        return {"content": [{**entry(t, v), "top_logprobs": [entry(i, w) for i, w in top]}
                            for t, v, top in zip(e.tokens, e.logprobs, e.top_logprobs)]}

    # --- running jobs -------------------------------------------------------------------------------------------

    async def _answer(self, request, body, jobs, stream, head, chunk_head, chunk, choices, first=None):
        """The response to checked jobs: server-sent events (chunk(job, event) each), or once all have finished
        one JSON object with choices(results) and usage."""
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return self._stream(request, jobs, chunk_head, chunk, include_usage, first=first)
        try:
            results = await self._run_all(request, jobs)
        except BadRequest as e:
            return self._refuse(e, self._retry(e))
        if results is None:  # the client went away
            return JSONResponse({}, status_code=499)
        return JSONResponse({**head, "choices": choices(results), "usage": self._usage(jobs, results)})

    def _refuse(self, e: BadRequest, headers: dict | None = None) -> JSONResponse:
        """OpenAI's error object for a refused request, and the log line the server writes for every request."""
        if self.engine.log is not None:
            self.engine.log(f"refused: {e.status} {e.param or '-'}: {e.message}")
        return error_response(e, headers)

    def _retry(self, e: BadRequest) -> dict | None:
        return {"Retry-After": str(self.retry_after)} if e.status in (429, 503) else None

    def _submit(self, jobs) -> None:
        loop = asyncio.get_running_loop()
        for i, job in enumerate(jobs):
            job.queue = asyncio.Queue()
            job.request.emit = lambda e, q=job.queue: loop.call_soon_threadsafe(q.put_nowait, e)
            try:
                self.engine.submit(job.request)
            except (QueueFull, EngineStopping, ArgumentError) as err:
                for done in jobs[:i]:  # a request's choices run all or none
                    self.engine.cancel(done.request.id)
                if isinstance(err, QueueFull):
                    raise BadRequest(f"the server is busy: {err}; retry later", status=429, code="queue_full") from None
                if isinstance(err, EngineStopping):
                    raise BadRequest(f"the server is not taking requests: {err}", status=503) from None
                raise BadRequest(str(err), err.param) from None

    async def _run_all(self, request: HTTPRequest, jobs) -> list[Event] | None:
        """Every job's whole output; None if the client went away (its jobs are then cancelled)."""
        self._submit(jobs)
        totals = [Event() for _ in jobs]
        try:
            for job, total in zip(jobs, totals):
                while True:
                    try:
                        e = await asyncio.wait_for(job.queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            raise asyncio.CancelledError from None
                        continue
                    total.extend(e)
                    if e.finish_reason:
                        if e.finish_reason == "error":
                            raise BadRequest(f"internal error: {e.error}", status=500)
                        break
        except asyncio.CancelledError:
            for job in jobs:
                self.engine.cancel(job.request.id)
            return None
        return totals

    def _stream(self, request, jobs, head, chunk, include_usage, first=None):
        try:
            self._submit(jobs)
        except BadRequest as e:
            return self._refuse(e, self._retry(e))

        async def events():
            done = [Event() for _ in jobs]
            try:
                if first is not None:
                    for job in jobs:
                        yield _sse({**head, "choices": [first(job)]})
                pending = {asyncio.ensure_future(job.queue.get()): k for k, job in enumerate(jobs)}
                while pending:
                    finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for f in finished:
                        k = pending.pop(f)
                        e = f.result()
                        done[k].extend(e)
                        if e.finish_reason == "error":
                            yield _sse({"error": {"message": f"internal error: {e.error}", "type": "server_error"}})
                            e.finish_reason = "stop"
                        if e.text or e.tokens or e.finish_reason:
                            yield _sse({**head, "choices": [chunk(jobs[k], e)]})
                        if not e.finish_reason:
                            pending[asyncio.ensure_future(jobs[k].queue.get())] = k
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": self._usage(jobs, done)})
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): nothing of ours keeps running
                for job, total in zip(jobs, done):
                    if not total.finish_reason:
                        self.engine.cancel(job.request.id)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _usage(self, jobs, results) -> dict:
        # a prompt counts once however many choices (n) it has; its jobs share one list of ids
        prompt = sum(len(p) for p in {id(job.request.prompt): job.request.prompt for job in jobs}.values())
        completion = sum(len(r.tokens) for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Job:
    def __init__(self, index: int, request: Request):
        self.index, self.request, self.queue = index, request, None


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
