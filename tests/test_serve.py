"""serve.py against the official `openai` client and raw HTTP: a server started on 127.0.0.1 (a free port) over a
small random Hugging Face checkpoint with a tokenizer trained here; outputs checked against lj.generate and
lj.forward; the continuous-batching engine's properties (alone == among others, no compilation after warm-up)."""

import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

import llama_jax as lj
from llama_jax import score
from llama_jax.text import chat_template as chat
from llama_jax.text.tokenizer import train_tokenizer
from tests.hf_util import make_hf_llama

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 128
PROMPTS = ["The king rode", "Once upon a time", "世界", "A", "the queen waited by the river and the king"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base url, checkpoint, server process, its stderr file)."""
    d = tmp_path_factory.mktemp("serve")
    text = "The king rode to the castle at night, and the queen waited by the river. 世界 🦊 Once upon a time.\n"
    tok = train_tokenizer([text * 30], 300, d / "tok" / "tokenizer.model")
    make_hf_llama(d / "random", vocab_size=300, hidden_size=64, layers=2, heads=4, kv_heads=2, ffn=96,
                  max_positions=256)
    # Exported as the project exports: AutoTokenizer on it (lm-eval-harness's tokenizer) gives the project's ids.
    config, params = lj.load_hf_checkpoint(d / "random")
    lj.save_hf_checkpoint(d / "model", config, params, tok, chat_template=chat.PROJECT_TEMPLATE,
                          stop_tokens=chat.stop_tokens(tok))
    # The server then reads tokenizer.model (SentencePiece): a random model emits invalid UTF-8 byte runs, which
    # SentencePiece decodes byte by byte, so text streamed in pieces equals the whole decode.
    (d / "model" / "tokenizer.json").unlink()
    port = _free_port()
    log = open(d / "server.log", "w+")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(d / "model"), "--port",
                             str(port), "--max-batch", "16", "--max-len", str(MAX_LEN), "--model-name", "small"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=d)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, (d / "server.log").read_text()
        try:
            if _get(port, "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        pytest.fail("the server did not become ready: " + (d / "server.log").read_text())
    ckpt = lj.load_checkpoint(d / "model")
    yield base, port, ckpt, proc, d / "server.log"
    if proc.poll() is None:
        proc.kill()


def _get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, json.loads(r.read())


def _post(port, path, body: bytes | dict):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", path, body if isinstance(body, bytes) else json.dumps(body).encode(),
              {"Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, json.loads(r.read() or b"{}"), dict(r.getheaders())


def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="none", max_retries=0)


def greedy(ckpt, ids, n):
    return lj.generate(ckpt.params, ckpt.config, [ids], max_new_tokens=n, temperature=0.0,
                       stop_tokens=ckpt.stop_tokens)[0]


def text_of(ckpt, ids, tokens):
    """What the server returns for new tokens: their text, continuing the prompt, without a final stop token."""
    tokens = [t for t in tokens if t not in ckpt.stop_tokens]
    return ckpt.tokenizer.decode(ids + tokens)[len(ckpt.tokenizer.decode(ids)):]


def test_completions_greedy_equal_generate_streamed_or_not_and_n(served):
    c, ckpt = client(served), served[2]
    tok = ckpt.tokenizer
    r = c.completions.create(model="small", prompt=PROMPTS, max_tokens=12, temperature=0, n=2)
    assert [ch.index for ch in r.choices] == list(range(2 * len(PROMPTS)))
    for ch in r.choices:
        ids = tok.encode(PROMPTS[ch.index // 2], bos=True)
        expected = greedy(ckpt, ids, 12)
        assert ch.text == text_of(ckpt, ids, expected), PROMPTS[ch.index // 2]
        assert ch.finish_reason == ("stop" if expected[-1] in ckpt.stop_tokens else "length")
    prompt_tokens = sum(len(tok.encode(p, bos=True)) for p in PROMPTS)
    assert r.usage.prompt_tokens == prompt_tokens and r.usage.total_tokens == prompt_tokens + r.usage.completion_tokens
    parts = list(c.completions.create(model="small", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text
    assert parts[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # Token ids as the prompt, no BOS added.
    ids = tok.encode(PROMPTS[1])
    r = c.completions.create(model="small", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == text_of(ckpt, ids, greedy(ckpt, ids, 8)) and r.usage.prompt_tokens == len(ids)


def test_logprobs_and_echo_equal_log_softmax_of_forward(served):
    c, ckpt = client(served), served[2]
    ids = ckpt.tokenizer.encode(PROMPTS[0], bos=True)
    r = c.completions.create(model="small", prompt=ids, max_tokens=6, temperature=0, logprobs=3, echo=True)
    lp = r.choices[0].logprobs
    new = greedy(ckpt, ids, 6)
    allids = ids + new
    ref = np.asarray(jax.nn.log_softmax(lj.forward(ckpt.params, jnp.asarray([allids]), ckpt.config), -1))[0]
    assert len(lp.token_logprobs) == len(allids) and lp.token_logprobs[0] is None
    expected = [float(ref[t - 1, allids[t]]) for t in range(1, len(allids))]
    np.testing.assert_allclose(lp.token_logprobs[1:], expected, atol=1e-4)
    for t in range(1, len(allids)):  # the top 3 alternatives (a dict by text: tokens with equal text collide)
        top3 = np.sort(ref[t - 1])[::-1][:3]
        assert max(lp.top_logprobs[t].values()) == pytest.approx(top3[0], abs=1e-4)
        assert all(np.min(np.abs(top3 - v)) < 1e-4 for v in lp.top_logprobs[t].values())
    assert r.choices[0].text.startswith(PROMPTS[0])
    # echo + max_tokens 0: the prompt's log-probabilities only (what loglikelihood requests of harnesses need).
    r = c.completions.create(model="small", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    np.testing.assert_allclose(r.choices[0].logprobs.token_logprobs[1:], expected[:len(ids) - 1], atol=1e-4)
    assert r.usage.completion_tokens == 0 and r.choices[0].text == ckpt.tokenizer.decode(ids)


def test_chat_streamed_and_not_stops_at_the_end_of_turn(served):
    c, ckpt = client(served), served[2]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The king rode"}]
    ids = chat.encode_conversation(ckpt.tokenizer, ckpt.chat_template, messages, add_generation_prompt=True)
    expected = greedy(ckpt, ids, 20)
    r = c.chat.completions.create(model="small", messages=messages, max_tokens=20, temperature=0, logprobs=True,
                                  top_logprobs=2)
    assert r.choices[0].message.content == text_of(ckpt, ids, expected)
    assert r.choices[0].message.role == "assistant"
    assert len(r.choices[0].logprobs.content) == len(expected) == r.usage.completion_tokens
    ref = np.asarray(jax.nn.log_softmax(lj.forward(ckpt.params, jnp.asarray([ids + expected]), ckpt.config), -1))
    for k, entry in enumerate(r.choices[0].logprobs.content):
        row = ref[0, len(ids) + k - 1]
        assert entry.logprob == pytest.approx(row[expected[k]], abs=1e-4)
        assert [e.logprob for e in entry.top_logprobs] == pytest.approx(np.sort(row)[::-1][:2], abs=1e-4)
    parts = list(c.chat.completions.create(model="small", messages=messages, max_tokens=20, temperature=0,
                                           stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == r.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_a_chat_s_next_turn_reuses_the_keys_and_values_of_the_last(served):
    """The client resends the conversation: the server prefills only what follows the earlier turns (a prefix hit
    in /health) and answers as lj.generate does from scratch."""
    c, ckpt = client(served), served[2]
    messages = [{"role": "system", "content": "Once upon a time the king rode."},
                {"role": "user", "content": "the queen waited by the river"}]
    first = c.chat.completions.create(model="small", messages=messages, max_tokens=12, temperature=0)
    before = _get(served[1], "/health")[1]["prefix_cache"]
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "and the king"}]
    ids = chat.encode_conversation(ckpt.tokenizer, ckpt.chat_template, messages, add_generation_prompt=True)
    second = c.chat.completions.create(model="small", messages=messages, max_tokens=12, temperature=0)
    after = _get(served[1], "/health")[1]["prefix_cache"]
    assert second.choices[0].message.content == text_of(ckpt, ids, greedy(ckpt, ids, 12))
    assert after["hits"] == before["hits"] + 1, (before, after)
    assert after["reused_tokens"] - before["reused_tokens"] >= first.usage.prompt_tokens


def test_stop_strings_cut_the_text_even_across_tokens(served):
    c, ckpt = client(served), served[2]
    ids = ckpt.tokenizer.encode(PROMPTS[4], bos=True)
    full = text_of(ckpt, ids, greedy(ckpt, ids, 24))
    pieces = [ckpt.tokenizer.decode([t]) for t in greedy(ckpt, ids, 24)]
    # a stop string made of the end of one token's text and the start of the next one's
    at = next(i for i in range(2, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    stop = pieces[i := at][-1:] + pieces[i + 1][:1]
    cut = full.find(stop)
    for stream in (False, True):
        r = c.completions.create(model="small", prompt=PROMPTS[4], max_tokens=24, temperature=0, stop=[stop, "@@"],
                                 stream=stream)
        chunks = list(r) if stream else [r]
        assert "".join(ch.choices[0].text for ch in chunks) == full[:cut]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_sixteen_concurrent_streaming_clients_get_their_greedy_answers(served):
    c, ckpt = client(served), served[2]
    before = _get(served[1], "/health")[1]["compilations_after_warm_up"]
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]

    def ask(prompt):
        return "".join(ch.choices[0].text for ch in c.completions.create(
            model="small", prompt=prompt, max_tokens=16, temperature=0, stream=True))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, prompts))
    for prompt, text in zip(prompts, got):
        ids = ckpt.tokenizer.encode(prompt, bos=True)
        assert text == text_of(ckpt, ids, greedy(ckpt, ids, 16)), prompt
    health = _get(served[1], "/health")[1]
    assert health["compilations_after_warm_up"] == before == 0 and health["active"] == 0
    assert health["steps_by_batch_size"]["16"] > 0, health


def test_one_client_alone_runs_one_row_steps(served):
    c, ckpt = client(served), served[2]
    before = _get(served[1], "/health")[1]
    text = "".join(ch.choices[0].text for ch in c.completions.create(model="small", prompt=PROMPTS[0],
                                                                      max_tokens=12, temperature=0, stream=True))
    ids = ckpt.tokenizer.encode(PROMPTS[0], bos=True)
    assert text == text_of(ckpt, ids, greedy(ckpt, ids, 12))
    after = _get(served[1], "/health")[1]
    used = {n: after["steps_by_batch_size"][n] - before["steps_by_batch_size"][n] for n in after["steps_by_batch_size"]}
    assert used["1"] >= 11 and all(v == 0 for n, v in used.items() if n != "1"), used
    assert after["compilations_after_warm_up"] == 0


def test_a_seeded_sample_is_reproducible_alone_or_among_others(served):
    c = client(served)
    ask = lambda seed: c.completions.create(model="small", prompt=PROMPTS[1], max_tokens=12, temperature=1.0,
                                            top_p=0.9, seed=seed).choices[0].text
    alone = ask(7)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        crowd = list(pool.map(ask, [7, 8, 7, 9, 7, 10]))
    assert crowd[0] == crowd[2] == crowd[4] == alone
    r = c.completions.create(model="small", prompt=PROMPTS[1], max_tokens=12, temperature=1.0, seed=7, n=2)
    assert r.choices[0].text != r.choices[1].text  # n choices from one seed differ


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "x", "top_p": 2}, 400, "top_p"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"prompt": "x", "n": 100000}, 400, "n"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "word " * 400}, 400, "prompt"),
    ({"prompt": [1, 2, 99999]}, 400, "prompt"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "max_tokens": MAX_LEN}, 400, "max_tokens"),  # beyond the context: refused, as OpenAI does
])
def test_each_bad_request_gets_its_status_and_the_server_keeps_serving(served, body, status, param):
    got, answer, _ = _post(served[1], "/v1/completions", body)
    assert got == status and answer["error"]["param"] == param and answer["error"]["message"]
    assert _get(served[1], "/health")[0] == 200


def test_bad_chat_requests(served):
    hi = [{"role": "user", "content": "hi"}]
    for body, param in (({"messages": "hi"}, "messages"), ({"messages": [{"role": "user"}]}, "messages"),
                        ({"messages": hi, "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
                        ({"messages": hi, "max_tokens": MAX_LEN}, "max_tokens")):
        got, answer, _ = _post(served[1], "/v1/chat/completions", body)
        assert got == 400 and answer["error"]["param"] == param, answer
    assert "'wizard' is not one of system, developer, user, assistant, tool" in _post(
        served[1], "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]})[1]["error"]["message"]
    assert _post(served[1], "/v1/chat/completions", {"messages": hi, "max_tokens": MAX_LEN})[1]["error"]["code"] == \
        "context_length_exceeded"
    assert _post(served[1], "/v1/nothing", {})[0] == 404
    # Each refused request has its line in the log, as each answered one has.
    assert "refused: 400 messages: messages[0].role 'wizard'" in served[4].read_text()


def long_prompt(ckpt, n):
    """A prompt whose greedy continuation runs n tokens without a stop token (so the request stays running)."""
    for prompt in (p + " " + q for p in PROMPTS for q in PROMPTS):
        if not set(greedy(ckpt, ckpt.tokenizer.encode(prompt, bos=True), n)) & set(ckpt.stop_tokens):
            return prompt
    raise AssertionError("no prompt runs that long")


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    port = served[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    prompt = long_prompt(served[2], 100)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 100, "stream": True,
                                                        "temperature": 0}).encode(),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.readline().startswith(b"data: ")
    seen_active = _get(port, "/health")[1]["active"]
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 20
    while _get(port, "/health")[1]["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    health = _get(port, "/health")[1]
    assert seen_active == 1 and health["active"] == 0


def test_models_and_health(served):
    status, models = _get(served[1], "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["small"]
    assert _get(served[1], "/health")[1]["slots"] == 16


TASK_YAML = """task: llama_jax_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.lm_eval
def test_lm_eval_harness_local_completions_gets_the_library_s_log_likelihoods(served, tmp_path, monkeypatch):
    """lm-eval-harness's local-completions model pointed at the server: its log-likelihoods equal
    score_continuations', and its acc / acc_norm equal `python -m llama_jax.eval choice` on the same questions."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from llama_jax import eval as ev

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = served[2]
    questions = [{"context": "The king rode to the", "choices": ["castle", "river", "fox"], "answer": 0},
                 {"context": "Once upon a", "choices": ["time", "night"], "answer": 1},
                 {"context": "the queen waited by the", "choices": ["river", "green", "king"], "answer": 2},
                 {"context": "世界", "choices": ["🦊", "fox"], "answer": 0}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (tmp_path / "task.yaml").write_text(TASK_YAML.format(path=tmp_path / "q.jsonl"))
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["llama_jax_local_choice"], task_manager=TaskManager(include_path=str(
            tmp_path)), log_samples=True,
        model_args=f"model=small,base_url={served[0]}/v1/completions,tokenizer={served[2].source.split()[-1]},"
                   "tokenizer_backend=huggingface,add_bos_token=True,num_concurrent=1,max_retries=1")
    samples = out["samples"]["llama_jax_local_choice"]
    ours = ev.choice(ckpt.params, ckpt.config, ckpt.tokenizer, questions)
    metrics = out["results"]["llama_jax_local_choice"]
    assert metrics["acc,none"] == pytest.approx(ours["acc"]) and metrics["acc_norm,none"] == pytest.approx(
        ours["acc_norm"])
    for sample in samples:
        q = questions[sample["doc_id"]]
        pairs = [ev.loglikelihood_request(ckpt.tokenizer, q["context"], " " + c) for c in q["choices"]]
        expected = score.score_continuations(ckpt.params, ckpt.config, pairs)
        got = [r[0] for r in sample["resps"]]
        np.testing.assert_allclose([g[0] for g in got], [e[0] for e in expected], atol=1e-4)
        assert [bool(g[1]) for g in got] == [e[1] for e in expected]


def test_a_full_queue_gets_429_and_a_stopping_engine_503_with_retry_after(served):
    """The HTTP layer's answers to an engine that cannot take a request (a stand-in engine, so the queue is full
    on demand)."""
    import threading

    import uvicorn

    from llama_jax.errors import ArgumentError
    from llama_jax.serve.api import Server
    from llama_jax.serve.engine import EngineStopping, QueueFull

    ckpt = served[2]

    class Busy:
        tokenizer, config, max_len = ckpt.tokenizer, ckpt.config, 128
        error = QueueFull("2 requests are waiting (the queue holds 2)")
        log = None

        def submit(self, request):
            raise self.error

        def cancel(self, request_id):
            pass

        def stats(self):
            return {"ready": True, "slots": 1, "active": 1, "waiting": 2, "steps": 0,
                    "compilations_after_warm_up": 0}

    engine = Busy()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(Server(engine, "small", None).app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        for stream in (False, True):
            status, answer, headers = _post(port, "/v1/completions", {"prompt": "x", "stream": stream})
            assert status == 429 and headers["retry-after"] == "1" and "busy" in answer["error"]["message"]
        engine.error = EngineStopping("the engine is shutting down")
        status, answer, headers = _post(port, "/v1/completions", {"prompt": "x"})
        assert status == 503 and headers["retry-after"] == "1"
        # A refused field is named by the engine's error itself, whatever its message says.
        engine.error = ArgumentError("seed: not this one: odd=1", "seed")
        status, answer, _ = _post(port, "/v1/completions", {"prompt": "x"})
        assert status == 400 and answer["error"]["param"] == "seed"
        status, answer, _ = _post(port, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 400 and answer["error"]["param"] == "messages"  # no chat template: use completions
    finally:
        server.should_exit = True
        thread.join()


class _Letters:
    """A stand-in tokenizer for in-process engines over tiny random models: any id decodes to a letter."""
    vocab_size = 50

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)


@pytest.mark.parametrize("max_len", [2, 5])
def test_an_engine_shorter_than_a_prompt_bucket_still_serves_up_to_its_length(max_len):
    from llama_jax.serve.engine import Engine, Request

    config = lj.ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64)
    params = lj.init_params(config, jax.random.key(0))
    engine = Engine(params, config, _Letters(), max_batch=2, max_len=max_len)
    engine.start()
    try:
        out = engine.generate(Request(prompt=[1], max_tokens=10, temperature=0.0), timeout=60)
        assert engine.buckets[-1] == max_len and engine.stats()["compilations_after_warm_up"] == 0
        expected = lj.generate(params, config, [[1]], max_new_tokens=max_len - 1, temperature=0.0)[0]
        assert out.tokens == expected and out.finish_reason == "length"
    finally:
        engine.stop()


def _browser():
    """Headless Chromium through selenium (Debian's chromium and chromium-driver; .ci/run installs them and sets
    LLAMA_JAX_BROWSER=required, so that CI never skips the page's test)."""
    import shutil

    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (browser and driver):
        message = "the playground's test needs Chromium: apt-get install chromium chromium-driver"
        if os.environ.get("LLAMA_JAX_BROWSER") == "required":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_the_playground_page_streams_the_api_s_answer_and_shows_each_token_s_alternatives(served, tmp_path):
    """GET / in a real browser: a prompt at temperature 0 renders the API's greedy completion; a token's
    alternatives add up to at most 1 with the chosen one first; sampled with top-k 3, every alternative past the
    third is shown cut by top-k. Leaves a screenshot (LLAMA_JAX_SCREENSHOT or the test's directory)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    c = client(served)
    assert f"the playground page: http://127.0.0.1:{served[1]}/" in served[4].read_text()  # serve.py says where
    page = _browser()
    try:
        page.get(served[0] + "/")
        wait = WebDriverWait(page, 60)
        wait.until(lambda d: "small" in d.find_element(By.ID, "model").text)

        def run(prompt, **settings):
            for name, value in settings.items():
                field = page.find_element(By.ID, name)
                field.clear()
                field.send_keys(str(value))
            box = page.find_element(By.ID, "input")
            box.clear()
            box.send_keys(prompt)
            page.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_element(By.ID, "output").get_attribute("data-done"))
            return page.execute_script("const o = document.getElementById('output');"
                                       "return o.textContent.slice(o.querySelector('.prompt-text').textContent.length)")

        rendered = run(PROMPTS[4], temperature=0, max_tokens=16)
        api = c.completions.create(model="small", prompt=PROMPTS[4], max_tokens=16, temperature=0)
        assert rendered == api.choices[0].text and rendered
        tokens = page.find_elements(By.CSS_SELECTOR, "#output .tok")
        assert tokens
        tokens[0].click()
        rows = page.find_elements(By.CSS_SELECTOR, "#details table.alternatives tr[data-p]")
        p = [float(r.get_attribute("data-p")) for r in rows]
        assert len(p) >= 2 and sum(p) <= 1 + 1e-6 and p == sorted(p, reverse=True)
        assert "chosen" in rows[0].get_attribute("class")  # greedy: the most likely one

        run(PROMPTS[1], temperature=1, top_k=3, seed=7, max_tokens=24)
        page.find_elements(By.CSS_SELECTOR, "#output .tok")[2].click()
        rows = page.find_elements(By.CSS_SELECTOR, "#details table.alternatives tr[data-p]")
        why = [r.find_element(By.CSS_SELECTOR, ".why").text for r in rows]
        assert all(w.startswith("cut by top-k") for w in why[3:]) and len(why) > 3, why
        assert not any(w.startswith("cut by top-k") for w in why[:3]), why
        shot = Path(os.environ.get("LLAMA_JAX_SCREENSHOT") or tmp_path / "playground.png")
        page.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert _get(served[1], "/health")[1]["compilations_after_warm_up"] == 0
    finally:
        page.quit()


def test_sigterm_ends_the_requests_in_flight_and_exits_0(served):
    """Last in this module: it stops the server."""
    c, proc = client(served), served[3]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        prompt = long_prompt(served[2], 60)
        pending = pool.submit(lambda: c.completions.create(model="small", prompt=prompt, max_tokens=60,
                                                           temperature=0))
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        answer = pending.result(timeout=60)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 60
    assert proc.wait(timeout=60) == 0
    log = served[4].read_text()
    assert "stopped" in log and "Traceback" not in log and "request " in log



def test_steps_run_the_smallest_power_of_two_covering_the_occupied_slots():
    """Requests arriving one after another fill slots lowest first; each step runs 1, 2, 4 or 5 rows (the pool)
    as they need, every size compiled at warm-up, and each request's greedy tokens are what it gets alone."""
    import queue
    import threading

    from llama_jax.serve.engine import Engine, Request

    config = lj.ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=128)
    params = lj.init_params(config, jax.random.key(0))
    engine = Engine(params, config, _Letters(), max_batch=5, max_len=128)
    engine.start()
    try:
        assert engine.step_sizes == (1, 2, 4, 5)
        prompts = [[1 + i, 7, 3 + i] for i in range(5)]
        results, started = {}, []
        for i, prompt in enumerate(prompts):  # each arrives once the ones before it are decoding
            first = threading.Event()
            events = queue.Queue()

            def emit(e, events=events, first=first):
                events.put(e)
                first.set()

            r = Request(prompt=prompt, max_tokens=60 - 10 * i, temperature=0.0, emit=emit)
            engine.submit(r)
            assert first.wait(60)
            started.append(events)
        for i, events in enumerate(started):
            tokens = []
            while True:
                e = events.get(timeout=60)
                tokens += e.tokens
                if e.finish_reason:
                    break
            results[i] = tokens
        stats = engine.stats()  # before lj.generate below compiles in this process too
        assert all(stats["steps_by_batch_size"][str(n)] > 0 for n in (1, 2, 4, 5)), stats
        assert stats["compilations_after_warm_up"] == 0
        for i, prompt in enumerate(prompts):
            alone = lj.generate(params, config, [prompt], max_new_tokens=60 - 10 * i, temperature=0.0)[0]
            assert results[i] == alone, i
    finally:
        engine.stop()


def _tiny_engine(**kwargs):
    from llama_jax.serve.engine import Engine

    config = lj.ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=256)
    params = lj.init_params(config, jax.random.key(1))
    engine = Engine(params, config, _Letters(), **{"max_batch": 4, "max_len": 256, **kwargs})
    engine.start()
    return engine, params, config


def _run(engine, prompt, n, **kwargs):
    from llama_jax.serve.engine import Request

    return engine.generate(Request(prompt=prompt, max_tokens=n, temperature=0.0, **kwargs), timeout=120)


def _prompt(n, seed):
    return [1, *np.random.default_rng(seed).integers(3, 50, n - 1).tolist()]


def test_prefix_reuse_continues_a_finished_conversation_and_copies_a_running_one_s_prompt():
    """Turn 2 = turn 1's prompt + its answer + more: prefilled from where turn 1's keys/values end (a hit in
    /health); a prompt sharing a running request's first 40 tokens copies them into its own slot. Greedy tokens
    equal an engine without reuse, and lj.generate; log-probabilities agree."""
    import queue

    from llama_jax.serve.engine import Request, _compile_count

    engine, params, config = _tiny_engine(prefill_chunk=16)
    cold, _, _ = _tiny_engine(prefill_chunk=16, prefix_reuse=False)
    compiled = _compile_count()
    try:
        turn1 = _prompt(40, 0)
        a1 = _run(engine, turn1, 20, logprobs=0)
        turn2 = turn1 + a1.tokens + _prompt(30, 1)[1:]
        a2 = _run(engine, turn2, 20, logprobs=0)
        stats = engine.stats()["prefix_cache"]
        assert stats["hits"] == 1 and stats["reused_tokens"] == len(turn1) + 19, stats  # the last answer token
        # is fed by the step after it, so its keys/values are not known to be there
        b2 = _run(cold, turn2, 20, logprobs=0)
        assert cold.stats()["prefix_cache"]["hits"] == 0

        # A running request's prompt: the second request shares its first 40 tokens and runs beside it.
        events = queue.Queue()
        shared = _prompt(40, 2)
        engine.submit(Request(prompt=shared + [5, 6], max_tokens=60, temperature=0.0, emit=events.put))
        assert events.get(timeout=60).tokens  # decoding: its prompt's keys/values are in its slot
        before = engine.stats()["prefix_cache"]
        other = shared + _prompt(12, 3)[1:]
        got = _run(engine, other, 15)
        after = engine.stats()["prefix_cache"]
        assert after["hits"] == before["hits"] + 1 and after["reused_tokens"] - before["reused_tokens"] == 40
        assert _compile_count() == compiled  # neither engine compiled after its warm-up

        assert a2.tokens == b2.tokens == lj.generate(params, config, [turn2], max_new_tokens=20, temperature=0.0)[0]
        np.testing.assert_allclose(a2.logprobs, b2.logprobs, atol=1e-5)
        assert got.tokens == lj.generate(params, config, [other], max_new_tokens=15, temperature=0.0)[0]
    finally:
        engine.stop(drain=False)
        cold.stop(drain=False)


def test_chunked_prefill_equals_one_piece():
    """Prompts shorter than, equal to and several times a 16-token chunk give the tokens and log-probabilities of
    one-piece prefill (chunks of 256) and of lj.generate; the chunk counters show the pieces."""
    from llama_jax.serve.engine import _compile_count

    chunked, params, config = _tiny_engine(prefill_chunk=16, prefix_reuse=False)
    whole, _, _ = _tiny_engine(prefill_chunk=256, prefix_reuse=False)
    compiled = _compile_count()
    try:
        assert chunked.chunk_sizes == (16,) and whole.chunk_sizes == (16, 64, 256)
        prompts = [_prompt(n, n) for n in (5, 16, 17, 100)]
        outs = [(_run(chunked, p, 12, logprobs=3), _run(whole, p, 12, logprobs=3)) for p in prompts]
        assert chunked.stats()["prefill_chunks_by_size"] == {"16": 1 + 1 + 2 + 7}
        assert whole.stats()["prefill_chunks_by_size"] == {"16": 2, "64": 1, "256": 1}  # the smallest that holds it
        assert _compile_count() == compiled
        for p, (a, b) in zip(prompts, outs):
            assert a.tokens == b.tokens == lj.generate(params, config, [p], max_new_tokens=12, temperature=0.0)[0]
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
            assert [[i for i, _ in alts] for alts in a.top_logprobs] == [[i for i, _ in alts]
                                                                          for alts in b.top_logprobs]
    finally:
        chunked.stop(drain=False)
        whole.stop(drain=False)


def test_a_long_prompt_arriving_while_four_streams_decode_is_prefilled_between_their_steps():
    """Four streams decode; a 200-token prompt arrives: it is prefilled a 16-token chunk per step while they keep
    getting tokens, and every output equals what lj.generate gives it alone."""
    import queue

    from llama_jax.serve.engine import Request

    engine, params, config = _tiny_engine(prefill_chunk=16, max_batch=8)  # 200 tokens: 13 chunks
    try:
        prompts = [_prompt(8 + i, 10 + i) for i in range(4)]
        streams = [queue.Queue() for _ in prompts]
        timeline = []  # who got a token, in the order the engine emits them (from its one thread)
        for i, (p, q) in enumerate(zip(prompts, streams)):
            engine.submit(Request(prompt=p, max_tokens=50, temperature=0.0,
                                  emit=lambda e, i=i, q=q: (timeline.append(i), q.put(e))))
        for q in streams:
            assert q.get(timeout=60).tokens
        order = queue.Queue()
        long = _prompt(200, 20)
        submitted = len(timeline)
        engine.submit(Request(prompt=long, max_tokens=10, temperature=0.0,
                              emit=lambda e: (timeline.append("long"), order.put(("long", e)))))
        outputs = {i: [] for i in range(4)}
        for i, q in enumerate(streams):
            while True:
                e = q.get(timeout=60)
                outputs[i] += e.tokens
                if e.finish_reason:
                    break
        long_tokens = []
        while True:
            e = order.get(timeout=60)[1]
            long_tokens += e.tokens
            if e.finish_reason:
                break
        stats = engine.stats()
        assert stats["prefill_chunks_by_size"]["16"] >= 13 and stats["compilations_after_warm_up"] == 0, stats
        meanwhile = timeline[submitted:timeline.index("long")]  # while its 13 chunks ran, a step after each
        assert all(meanwhile.count(i) >= 10 for i in range(4)), meanwhile
        assert long_tokens == lj.generate(params, config, [long], max_new_tokens=10, temperature=0.0)[0]
        for i, p in enumerate(prompts):
            alone = lj.generate(params, config, [p], max_new_tokens=50, temperature=0.0)[0]
            assert [t for t in [*alone]][1:] == outputs[i], i  # the first token was taken above
    finally:
        engine.stop(drain=False)


def test_placement_reuses_in_place_copies_from_elsewhere_and_evicts_the_least_recently_used():
    from llama_jax.serve.placement import MIN_COPIED, place

    sizes = (1, 2, 4, 8)
    convo = list(range(100, 140))
    # Slot 0 (free) holds the conversation: the next turn goes there, after its 40 tokens.
    assert place(convo + [7, 8], {0: convo, 2: [5, 6]}, set(), {0: 3, 2: 1}, 8, sizes) == (0, 0, 40)
    # The whole prompt is held: the last token is still prefilled (its logits give the first new token).
    assert place(convo, {0: convo}, set(), {}, 8, sizes) == (0, 0, 39)
    # Held by free slot 1 while nothing runs: copied into slot 0 (a one-row step) rather than widening each step.
    assert place(convo + [7], {1: convo}, set(), {1: 3}, 8, sizes) == (0, 1, 40)
    # A running request (slot 0) holds it: copied into the free slot that keeps the step at 2 rows.
    assert place(convo + [9], {0: convo + [1, 2]}, {0}, {1: 5, 2: 4, 3: 9}, 8, sizes) == (1, 0, 40)
    # Too short a prefix elsewhere is not worth a copy; without reuse nothing is reused.
    short = convo[:MIN_COPIED - 1]
    assert place(short + [9], {0: short}, {0}, {}, 8, sizes) == (1, 1, 0)
    assert place(convo + [9], {0: convo}, set(), {}, 8, sizes, reuse=False) == (0, 0, 0)
    # No match: among the free slots that keep the step at 4 rows (0 and 1; 2 and 3 run), the least recently used;
    # a slot never used counts as least recent (it holds nothing).
    assert place([1, 2, 3], {0: [9], 1: [8]}, {2, 3}, {0: 7, 1: 3}, 8, sizes) == (1, 1, 0)
    assert place([1, 2, 3], {0: [9]}, {2}, {0: 7, 1: 3}, 8, sizes) == (3, 3, 0)
