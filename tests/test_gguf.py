"""GGUF files against transformers' own GGUF reader (its dequantization is an independent implementation, in
PyTorch): small files this test writes in every supported tensor type and both vocabulary kinds, bad files, and the
real SmolLM2-135M-Instruct from the package registry (logits, tokenizer, greedy chat, export)."""

import io
import sys

import numpy as np
import pytest
import torch

import llama_jax as lj
from llama_jax.cli import generate as generate_cli
from llama_jax.cli import hf as hf_cli
from llama_jax.text import chat_template
from tests.gguf_util import CHATML, SPECIALS, smollm2_file, write_gguf

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# Worst error of quantize -> dequantize relative to a tensor's largest value (block scales: max / 127, 15, 31, ...).
ROUND_TRIP = {"F32": 0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1 / 100, "Q5_0": 1 / 12, "Q5_1": 1 / 25, "Q4_0": 1 / 6,
              "Q4_1": 1 / 12}


def transformers_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def assert_close_logits(ours, theirs, rel=1e-4):
    err = float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))
    assert err <= rel, f"logits differ by {err:.2e} of their largest value"


@pytest.mark.parametrize("qtype", TYPES)
def test_every_tensor_type_loads_as_transformers_loads_it(qtype, tmp_path):
    path = tmp_path / f"m-{qtype}.gguf"
    original = write_gguf(path, qtype=qtype, tied=qtype in ("Q8_0", "Q4_K"))
    ckpt = lj.load_checkpoint(path)
    assert ckpt.config.tie_embeddings == (qtype in ("Q8_0", "Q4_K"))
    ids = [5, 262, 72, 101, 108, 108, 111, 10, 260, 268]
    logits = lj.forward(ckpt.params, np.asarray([ids], np.int32), ckpt.config)[0]
    assert_close_logits(logits, transformers_logits(path, ids))
    if qtype in ROUND_TRIP:  # the weights themselves: back in our layout, within the type's rounding
        wq = np.asarray(ckpt.params["layers"]["wq"][0])
        expected = original["blk.0.attn_q.weight"].T  # split halves, [in, out]: the permutation undone
        assert np.max(np.abs(wq - expected)) <= ROUND_TRIP[qtype] * np.abs(expected).max() + 1e-7
        assert np.max(np.abs(np.asarray(ckpt.params["embed"]) - original["token_embd.weight"])) <= \
            ROUND_TRIP[qtype] * np.abs(original["token_embd.weight"]).max() + 1e-7


def test_byte_level_vocabulary_tokenizes_as_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "m.gguf"
    write_gguf(path)
    tok = lj.load_checkpoint(path).tokenizer
    auto = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["the world at  in", "Ünïcödé — 日本語 🙂", "<|im_start|>user\nhi<|im_end|>\n", "  \n\t x"]:
        assert tok.encode_special(text) == auto.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode_special(text)) == text
    assert [tok.is_special(tok.token_id(s)) for s in SPECIALS] == [True] * 3
    assert lj.load_checkpoint(path).chat_template == CHATML
    assert lj.load_checkpoint(path).stop_tokens == (tok.token_id("<|im_end|>"),)


def test_sentencepiece_vocabulary_tokenizes_as_sentencepiece_and_transformers(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from tests.test_data import make_docs

    # A Llama-2-style model: BPE with byte fallback and a dummy prefix (the project's own tokenizers have none, and
    # transformers' GGUF reader assumes one).
    (tmp_path / "corpus.txt").write_text("".join(make_docs(300, 3)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, add_dummy_prefix=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   user_defined_symbols=["<|end|>"], minloglevel=2)
    model = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    path = tmp_path / "m.gguf"
    write_gguf(path, vocab="sentencepiece", sp_model=model)
    tok = lj.load_checkpoint(path).tokenizer
    auto = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["the king rode to the castle", "Hello, World!  twice", "naïve café ✓ 日本", "a<|end|>b"]:
        ours = tok.encode(text, bos=True)
        assert ours == auto.encode(text), text  # BOS first: llama vocabularies add it unless told not to
        assert ours[1:] == model.Encode(text) and ours[0] == model.bos_id(), text
        assert tok.decode(ours[1:]) == text


@pytest.mark.parametrize("damage,message", [
    ("truncate", "not a readable GGUF file"),
    ("arch", "general.architecture 'gpt2' is not supported; supported: llama, mistral"),
    ("f64", "has type F64, which cannot be dequantized"),
    ("magic", "not a GGUF file (it does not start with the bytes 'GGUF')"),
])
def test_bad_gguf_files_get_one_line(damage, message, tmp_path, capsys):
    path = tmp_path / "m.gguf"
    if damage == "arch":
        write_gguf(path, arch="gpt2")
    elif damage == "f64":
        write_gguf(path, extra_tensor=("output.weight", np.zeros((264, 256), np.float64)), tied=True)
    else:
        write_gguf(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"XXXX" + data[4:])
    assert generate_cli.main(["--checkpoint", str(path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0] and str(path) in err[0], err


# --- the real model ---------------------------------------------------------------------------------------------

QUESTIONS = ["What is the capital of France?", "And of Italy?", "Name a colour of the sky."]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_file()
    auto = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return path, lj.load_checkpoint(path), auto, model


def transformers_chat(auto, model, questions, max_new_tokens):
    """Greedy replies to a conversation, turn by turn, as transformers generates them from the chat template."""
    end = auto.convert_tokens_to_ids("<|im_end|>")
    history, replies = [], []
    for q in questions:
        history.append({"role": "user", "content": q})
        ids = auto.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=end, pad_token_id=end)[0, len(ids):].tolist()
        reply = auto.decode([t for t in out if t != end])
        history.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def test_smollm2_logits_and_template_equal_transformers(smollm2):
    path, ckpt, auto, model = smollm2
    assert ckpt.config.n_layers == 30 and ckpt.config.n_kv_heads == 3 and ckpt.config.tie_embeddings
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = chat_template.encode_conversation(ckpt.tokenizer, ckpt.chat_template, messages, add_generation_prompt=True)
    assert ids == auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    assert_close_logits(lj.forward(ckpt.params, np.asarray([ids], np.int32), ckpt.config)[0], theirs)


def test_smollm2_tokenizer_ids_equal_transformers(smollm2):
    _, ckpt, auto, _ = smollm2
    tok = ckpt.tokenizer
    texts = ["The quick brown fox jumps over the lazy dog.", "Ça va très bien, merci ! Größe, 東京, Москва, 🙂",
             "def f(x):\n    return x ** two  # comment\n\tindented", "<|im_start|>system\nBe brief.<|im_end|>\n",
             "<|endoftext|> text after an end", "   leading and trailing spaces   ", "emoji 👩‍👩‍👧 and symbols ∑≠"]
    for text in texts:
        assert tok.encode_special(text) == auto.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode_special(text)) == text
    # Digits: llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) split every digit alone;
    # transformers' GGUF reader ignores tokenizer.ggml.pre and keeps GPT-2's runs of digits.
    digits = tok.encode_special("in 2024, 31 cats")
    assert [tok.decode([t]) for t in digits][1:5] == [" ", "2", "0", "2"]


def test_smollm2_greedy_chat_answers_as_transformers(smollm2, capsys, monkeypatch):
    path, _, auto, model = smollm2
    expected = transformers_chat(auto, model, QUESTIONS, max_new_tokens=24)
    assert "Paris" in expected[0]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(q + "\n" for q in QUESTIONS)))
    assert generate_cli.main(["--checkpoint", str(path), "--chat", "--temperature", "0",
                              "--max-new-tokens", "24"]) == 0
    shown = capsys.readouterr().out.split("assistant> ")[1:]
    assert [s.split("\nyou> ")[0].rstrip("\n") for s in shown] == expected


def test_smollm2_export_loads_in_transformers_with_the_same_replies(smollm2, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    path, ckpt, auto, model = smollm2
    assert hf_cli.main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "hf")]) == 0
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    exported_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert transformers_chat(exported_tok, exported, QUESTIONS[:1], 24) == transformers_chat(auto, model,
                                                                                            QUESTIONS[:1], 24)
    back = lj.load_checkpoint(tmp_path / "hf")
    assert back.stop_tokens == ckpt.stop_tokens and back.chat_template == ckpt.chat_template
