import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import optim
from llama_jax.config import ModelConfig, TrainConfig
from llama_jax.data import chat as chat_data
from llama_jax.data import corpus as data
from llama_jax.data import token_files
from llama_jax.data.corpus import DataError
from llama_jax.examples.dialogues import conversations
from llama_jax.text import chat_template as chat
from llama_jax.text.tokenizer import train_tokenizer
from llama_jax.train import step as T

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Two plus two is four."}, {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [chat.render(c["messages"]) for c in conversations(300)]
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok") / "tokenizer.model")


def test_template_text():
    assert chat.render(CONV[:3]) == ("<|system|>Be brief.<|end|>\n<|user|>What is two plus two?<|end|>\n"
                                     "<|assistant|>Two plus two is four.<|end|>\n")
    assert chat.render(CONV[:2], add_generation_prompt=True).endswith("<|end|>\n<|assistant|>")


def test_training_and_generation_render_the_same_tokens(tok):
    tokens, _ = chat_data.encode(tok, CONV)
    assert tokens == [tok.bos_id] + tok.encode(chat.render(CONV))
    # What generate.py --chat feeds before the reply is a prefix of the training sequence.
    prompt = [tok.bos_id] + tok.encode(chat.render(CONV[:2], add_generation_prompt=True))
    assert tokens[:len(prompt)] == prompt
    assert tok.encode("<|end|>")[0] in chat.stop_tokens(tok)


def test_loss_mask_covers_exactly_the_assistant_tokens(tok):
    tokens, mask = chat_data.encode(tok, CONV)
    targets = [t for t, m in zip(tokens, mask) if m]
    expected = tok.encode("Two plus two is four.<|end|>") + tok.encode("You are welcome.<|end|>")
    assert targets == expected
    assert tok.decode(targets) == "Two plus two is four.<|end|>You are welcome.<|end|>"


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.mark.parametrize("record,message", [
    ("not json", "not valid JSON"),
    ({"msgs": []}, "expected {\"messages\""),
    ({"messages": [{"content": "hi"}]}, "message 0 has no 'role'"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "message 0 has unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     r"message 1 \(assistant\) has empty or missing 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
])
def test_bad_conversation_files_name_the_line(tmp_path, record, message):
    good = {"messages": CONV[1:3]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, record])
    with pytest.raises(DataError, match=f"d.jsonl:2: {message}"):
        chat_data.read_conversations(path)


def test_overlong_conversations_are_truncated_by_whole_turns(tok, tmp_path, capsys):
    long = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] + \
           [{"role": "user", "content": "more " * 10}, {"role": "assistant", "content": "ok " * 10}] * 5
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV}, {"messages": long}] * 3)
    meta = chat_data.prepare_chat(path, tok, tmp_path / "prep", val_fraction=0.0, seed=0, seq_len=64)
    assert meta["truncated"] == 3 and "3 conversations truncated" in capsys.readouterr().err
    split = token_files.open_split(tmp_path / "prep", "train", tok)
    bounds = list(split.doc_starts) + [split.n_tokens]
    for a, b in zip(bounds, bounds[1:]):
        assert b - a <= 65 and split.tokens[a] == tok.bos_id
        assert tok.decode(split.tokens[a + 1:b]).endswith("<|end|>\n")  # ends at a turn boundary


def test_a_held_out_conversation_keeps_its_loss_mask(tok, tmp_path, capsys):
    # val_fraction too small to draw any: the writer moves the last conversation's tokens and mask together.
    convs = list(conversations(6, seed=2))
    path = write_jsonl(tmp_path / "d.jsonl", convs)
    meta = chat_data.prepare_chat(path, tok, tmp_path / "prep", val_fraction=1e-9, seed=0, seq_len=128)
    assert "holding out the last one" in capsys.readouterr().err
    assert meta["counts"]["val"]["documents"] == 1 and meta["counts"]["train"]["documents"] == 5
    val = token_files.open_split(tmp_path / "prep", "val", tok)
    tokens, mask = chat_data.encode(tok, convs[-1]["messages"])
    np.testing.assert_array_equal(val.tokens, tokens)
    np.testing.assert_array_equal(val.target_mask, np.asarray(mask, np.uint8))
    assert not list((tmp_path / "prep").glob("*.tmp"))


def sft_batch(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", list(conversations(200, seed=1)))
    chat_data.prepare_chat(path, tok, tmp_path / "prep", val_fraction=0.0, seed=0, seq_len=64)
    split = token_files.open_split(tmp_path / "prep", "train", tok)
    return split, {k: jnp.asarray(v) for k, v in data.window_batch(split, np.arange(8), 64).items()}


def test_window_loss_mask_matches_assistant_targets(tok, tmp_path):
    split, batch = sft_batch(tok, tmp_path)
    idx = np.arange(8)[:, None] * 64 + np.arange(1, 65)[None]
    expected = np.asarray(split.target_mask[idx.ravel()]).reshape(8, 64).astype(bool)
    got = np.asarray(batch["loss_mask"]).astype(bool)
    assert np.all(got <= expected) and got.sum() > 0.9 * expected.sum()  # only the doc-boundary targets drop


def test_user_tokens_contribute_nothing_and_sft_loss_falls(tok, tmp_path):
    config = ModelConfig(vocab_size=400, dim=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=64)
    train = TrainConfig(batch_size=8, seq_len=64, lr=3e-3, warmup_steps=0, steps=60)
    split, batch = sft_batch(tok, tmp_path)
    params = optim.init_state(config, train, jax.random.key(0)).params
    grad = lambda b: jax.grad(lambda p: T.loss_sums(p, b, config, train)[0])(params)
    masked = batch["loss_mask"] == 0
    perturbed = dict(batch, targets=jnp.where(masked, (batch["targets"] + 7) % 400, batch["targets"]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), grad(batch), grad(perturbed))

    state = optim.init_state(config, train, jax.random.key(0))
    step = jax.jit(T.train_step, static_argnums=(2, 3), donate_argnums=0)
    losses = []
    for i in range(60):
        b = {k: jnp.asarray(v) for k, v in data.window_batch(split, np.arange(8) + 8 * (i % 4), 64).items()}
        state, m = step(state, b, config, train)
        losses.append(float(m["loss"]))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])
