"""Scoring and evaluation: perplexity against transformers, sliding windows, bits per byte, ragged batches, the
greedy flag, multiple-choice accuracy, --show-probs, and one-line errors."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llama_jax as lj
from llama_jax import sampling, score
from llama_jax.cli import eval as eval_cli
from llama_jax.cli import generate as generate_cli
from llama_jax.text.tokenizer import train_tokenizer
from tests.hf_util import make_hf_llama

TEXT = ("The king rode to the castle at night, and the queen waited by the river. 世界 🦊 Once upon a time, a fox "
        "ran through the green forest; the hunters followed.\n")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    tok = train_tokenizer([TEXT * 30], 300, d / "tok" / "tokenizer.model")
    make_hf_llama(d / "model", vocab_size=300, hidden_size=64, layers=2, heads=4, kv_heads=2, ffn=96,
                  max_positions=64)
    (d / "model" / "tokenizer.model").write_bytes(tok.model_bytes)
    return d


def run_json(capsys, argv):
    capsys.readouterr()
    assert eval_cli.main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_perplexity_equals_transformers_and_bits_per_byte_by_its_formula(hf_dir, capsys):
    import transformers

    short = "The king rode to the castle at night."
    (hf_dir / "short.txt").write_text(short)
    got = run_json(capsys, ["perplexity", "--checkpoint", str(hf_dir / "model"), "--data", str(hf_dir / "short.txt"),
                            "--dtype", "float32"])["total"]
    ckpt = lj.load_checkpoint(hf_dir / "model")
    ids = ckpt.tokenizer.encode(short, bos=True)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir / "model").eval()
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert got["tokens"] == len(ids) - 1 and got["bytes"] == len(short.encode())
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(loss * (len(ids) - 1) / (math.log(2) * len(short.encode())),
                                                 rel=1e-4)
    assert score.bits_per_byte(math.log(2) * 10, 5) == 2.0  # 10 bits over 5 bytes


@pytest.mark.parametrize("n,width,stride", [(1, 8, 3), (2, 8, 3), (8, 8, 3), (9, 8, 3), (50, 8, 1), (50, 8, 7),
                                            (100, 16, 8), (17, 16, 15)])
def test_windows_score_every_token_once_with_at_least_stride_context(n, width, stride):
    scored = []
    for start, end, first in score.windows(n, width, stride):
        assert end - start <= width and start <= first <= end
        assert first == 1 or first - start >= stride
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_sliding_windows_equal_their_definition_and_one_pass_when_the_text_fits(hf_dir):
    ckpt = lj.load_checkpoint(hf_dir / "model")
    doc = ckpt.tokenizer.encode(TEXT * 3, bos=True)
    assert len(doc) > 2 * ckpt.config.max_seq_len
    (nll, n), = score.nll_of_documents(ckpt.params, ckpt.config, [doc], stride=16)
    expected = 0.0
    for start, end, first in score.windows(len(doc), ckpt.config.max_seq_len, 16):
        lp = jax.nn.log_softmax(lj.forward(ckpt.params, jnp.asarray([doc[start:end]]), ckpt.config)[0], -1)
        expected -= sum(float(lp[t - start - 1, doc[t]]) for t in range(first, end))
    assert n == len(doc) - 1 and nll == pytest.approx(expected, rel=1e-5)
    fits = doc[:40]
    (one, _), = score.nll_of_documents(ckpt.params, ckpt.config, [fits], stride=16)
    lp = jax.nn.log_softmax(lj.forward(ckpt.params, jnp.asarray([fits]), ckpt.config)[0], -1)
    assert one == pytest.approx(-sum(float(lp[t - 1, fits[t]]) for t in range(1, 40)), rel=1e-5)


def test_ragged_batches_equal_one_by_one_and_the_greedy_flag_matches_generate(hf_dir):
    ckpt = lj.load_checkpoint(hf_dir / "model")
    rng = np.random.default_rng(0)
    pairs = [(list(rng.integers(3, 300, int(rng.integers(1, 40)))), list(rng.integers(3, 300, int(rng.integers(1, 9)))))
             for _ in range(12)]
    together = score.score_continuations(ckpt.params, ckpt.config, pairs)
    alone = [score.score_continuations(ckpt.params, ckpt.config, [p])[0] for p in pairs]
    np.testing.assert_allclose([s for s, _ in together], [s for s, _ in alone], rtol=1e-5)
    context = ckpt.tokenizer.encode("The king rode", bos=True)
    continuation = lj.generate(ckpt.params, ckpt.config, [context], max_new_tokens=6, temperature=0.0)[0]
    (lp, is_greedy), = score.score_continuations(ckpt.params, ckpt.config, [(context, continuation)])
    assert is_greedy
    other = continuation[:-1] + [(continuation[-1] + 1) % 300]
    assert not score.score_continuations(ckpt.params, ckpt.config, [(context, other)])[0][1]
    ref = jax.nn.log_softmax(lj.forward(ckpt.params, jnp.asarray([context + continuation]), ckpt.config)[0], -1)
    assert lp == pytest.approx(sum(float(ref[len(context) + i - 1, t]) for i, t in enumerate(continuation)),
                               rel=1e-5)


def test_choice_gets_the_accuracy_the_model_must_get(hf_dir, capsys):
    ckpt = lj.load_checkpoint(hf_dir / "model")
    tok = ckpt.tokenizer
    questions = [("The king rode to the", ["castle", "river", "fox"]), ("Once upon a", ["time", "night", "queen"]),
                 ("the queen waited by the", ["river", "green", "king"]), ("a fox ran", ["through", "to", "at"]),
                 ("世界", ["🦊", "fox", "the"])]
    # An independent log-likelihood: one forward pass over every context + " " + choice, right-padded to one
    # length (causal: the padding after a sequence changes nothing before it).
    wholes = [tok.encode(context + " " + c, bos=True) for context, choices in questions for c in choices]
    padded = np.zeros((len(wholes), max(map(len, wholes))), np.int32)
    for r, w in enumerate(wholes):
        padded[r, :len(w)] = w
    logp = np.asarray(jax.nn.log_softmax(lj.forward(ckpt.params, jnp.asarray(padded), ckpt.config), -1))
    lines, expect_acc, expect_norm = [], 0, 0
    for i, (context, choices) in enumerate(questions):
        lls = []
        for j, _ in enumerate(choices):
            r, k = 3 * i + j, len(tok.encode(context, bos=True))
            lls.append(sum(float(logp[r, t - 1, wholes[r][t]]) for t in range(k, len(wholes[r]))))
        best, best_norm = int(np.argmax(lls)), int(np.argmax(np.array(lls) / [len(c) for c in choices]))
        answer = best if i % 2 == 0 else (best + 1) % 3  # right on questions 0, 2, 4: acc must be 3/5
        expect_acc += answer == best
        expect_norm += answer == best_norm
        lines.append(json.dumps({"context": context, "choices": choices, "answer": answer}))
    (hf_dir / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    got = run_json(capsys, ["choice", "--checkpoint", str(hf_dir / "model"), "--tasks", str(hf_dir / "tasks.jsonl")])
    assert got["acc"] == expect_acc / 5 == 0.6 and got["acc_norm"] == expect_norm / 5 and got["n"] == 5


def test_show_probs_are_the_softmax_of_the_filtered_logits(hf_dir, capsys):
    capsys.readouterr()
    assert generate_cli.main(["--checkpoint", str(hf_dir / "model"), "--prompt", "The king", "--max-new-tokens", "3",
                              "--temperature", "0.7", "--top-k", "5", "--top-p", "0.8", "--show-probs", "6",
                              "--seed", "3"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("--- the 6 most likely"):].splitlines()[1:]
    ckpt = lj.load_checkpoint(hf_dir / "model")
    prompt = ckpt.tokenizer.encode("The king", bos=True)
    new = lj.generate(ckpt.params, ckpt.config, [prompt], max_new_tokens=3, temperature=0.7, top_k=5, top_p=0.8,
                      seed=3, stop_tokens=ckpt.stop_tokens)[0]
    rows = [line for line in table if not line.startswith("       ")]
    assert len(rows) == len(new)
    logits = lj.forward(ckpt.params, jnp.asarray([prompt + new]), ckpt.config)[0]
    for n, token in enumerate(new):
        l = logits[len(prompt) + n - 1][None]
        after = np.asarray(jax.nn.softmax(sampling.filtered_logits(l, 0.7, 5, 0.8)))[0]
        before = np.asarray(jax.nn.softmax(l / 0.7))[0]
        lines = table[1 + 7 * n: 7 + 7 * n]
        for line, i in zip(lines, np.argsort(-before, kind="stable")[:6]):
            shown_after, shown_before = re.search(r" ([\d.]+) \[([\d.]+)\]", line).groups()
            assert float(shown_after) == pytest.approx(after[i], abs=1e-4)
            assert float(shown_before) == pytest.approx(before[i], abs=1e-4)
            assert ("<- chosen" in line) == (i == token)
            assert ("cut by" in line) == (after[i] == 0)


@pytest.mark.parametrize("case", ["missing", "empty", "answer", "choices", "stride"])
def test_bad_inputs_get_one_line(hf_dir, tmp_path, capsys, case):
    model = str(hf_dir / "model")
    if case == "missing":
        argv, message = ["perplexity", "--checkpoint", model, "--data", str(tmp_path / "nope.txt")], "nope.txt"
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("")
        argv, message = ["perplexity", "--checkpoint", model, "--data", str(tmp_path / "empty.txt")], "no text"
    elif case == "answer":
        (tmp_path / "t.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "answer": 1}\n'
                                          '{"context": "a", "choices": ["b", "c"], "answer": 2}\n')
        argv, message = ["choice", "--checkpoint", model, "--tasks", str(tmp_path / "t.jsonl")], "t.jsonl:2"
    elif case == "choices":
        (tmp_path / "t.jsonl").write_text('{"context": "a", "choices": "b", "answer": 0}\n')
        argv, message = ["choice", "--checkpoint", model, "--tasks", str(tmp_path / "t.jsonl")], "\"choices\""
    else:
        (tmp_path / "x.txt").write_text("hello")
        argv, message = ["perplexity", "--checkpoint", model, "--data", str(tmp_path / "x.txt"), "--stride", "64"], \
            "--stride=64"
    capsys.readouterr()
    assert eval_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
