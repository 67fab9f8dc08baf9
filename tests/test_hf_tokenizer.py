"""Hugging Face tokenizers (tokenizer.json), Jinja chat templates and stop tokens, against transformers'
AutoTokenizer and apply_chat_template on tokenizers built here; and an HF directory with only those files."""

import contextlib
import io
import json

import numpy as np
import pytest
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import llama_jax as lj
from llama_jax.cli import generate as generate_cli
from llama_jax.data import chat as chat_data
from llama_jax.data import token_files
from llama_jax.text import chat_template as chat
from llama_jax.text.tokenizer import HFTokenizer, TextStream, load_tokenizer
from tests.hf_util import make_hf_llama

TEXTS = [
    "The king rode to the castle at night, and the queen waited by the river.",
    "世界上最高的山峰是哪座?珠穆朗玛峰。",
    "Emoji: 🦊🔥👍🏽 and a flag 🇫🇷!",
    "def f(x):\n\t    return  x  +  1   # spaces\n\n\n",
    "special strings in text: <|eot_id|> and <|begin_of_text|> and <|im_end|>",
    "Ünïcödé façade — naïve café; Ελληνικά; русский текст; עברית; हिन्दी",
]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = {"llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>"],
            "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}


def build(directory, style):
    """A byte-level BPE trained here, saved the way transformers saves one (Llama 3's or SmolLM's style)."""
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS[style],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXTS * 20, trainer)
    if style == "llama3":
        bos = "<|begin_of_text|>"
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tk.token_to_id(bos))])
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token="<|end_of_text|>",
                                                    chat_template=LLAMA3_TEMPLATE)
    else:
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>",
                                                    eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE)
    fast.save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module", params=["llama3", "chatml"])
def toks(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    auto = build(directory, request.param)
    return request.param, directory, auto, load_tokenizer(directory)


def ids_of(encoded):
    return list(encoded["input_ids"] if isinstance(encoded, (dict, transformers.BatchEncoding)) else encoded)


def test_ids_equal_auto_tokenizer_and_decode_round_trips(toks):
    _, _, auto, tok = toks
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == len(auto)
    for text in TEXTS:
        assert tok.encode(text, bos=True) == auto(text)["input_ids"], text
        assert tok.encode(text) == auto(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(tok.encode(text)) == text == auto.decode(tok.encode(text))
    assert tok.encode_batch(TEXTS, bos=True) == [auto(t)["input_ids"] for t in TEXTS]
    assert tok.bos_id == auto.bos_token_id and tok.eos_id == auto.eos_token_id


def test_streamed_text_equals_the_full_decode_at_every_prefix(toks):
    _, _, _, tok = toks
    for text in TEXTS:
        ids = tok.encode(text)
        stream, shown = TextStream(tok), ""
        for k, token in enumerate(ids, 1):
            new = stream.add(token)
            assert "\ufffd" not in new
            shown += new
            full = tok.decode(ids[:k])
            assert full.startswith(shown) and (shown == full or full.endswith("\ufffd") or
                                               len(full) > len(shown)), (text, k)
        shown += stream.flush()
        assert shown == text


def test_a_llama2_style_conversion_encodes_as_auto_tokenizer(tmp_path):
    """tokenizer.json as transformers converts a Llama-2-style SentencePiece model (Metaspace with a prepended
    "▁", byte fallback, <s> added by the post-processor), saved with save_pretrained: the same ids and text."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(TEXTS * 20), model_prefix=str(tmp_path / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, add_dummy_prefix=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "legacy": True}))
    transformers.AutoTokenizer.from_pretrained(tmp_path).save_pretrained(tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok = load_tokenizer(tmp_path / "hf")
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id) == (auto.bos_token_id, auto.eos_token_id)
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.encode(text, bos=True) == auto(text)["input_ids"] and ids == ids_of(
            auto(text, add_special_tokens=False)), text
        assert tok.decode(ids) == auto.decode(ids) == text
        stream = TextStream(tok)
        assert "".join(stream.add(t) for t in ids) + stream.flush() == text


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_templates_render_as_apply_chat_template(toks, add_generation_prompt):
    style, _, auto, tok = toks
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "世界上最高的山峰是哪座?"},
                {"role": "assistant", "content": "Everest 🏔"}, {"role": "user", "content": "And  the second?"}]
    for template in (tok.chat_template, chat.PROJECT_TEMPLATE, LLAMA3_TEMPLATE, CHATML_TEMPLATE):
        for msgs in (messages, messages[1:]):
            text = chat.render_template(template, msgs, add_generation_prompt, tok.special_tokens)
            assert text == auto.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt)
            assert chat.encode_conversation(tok, template, msgs, add_generation_prompt) == ids_of(
                auto.apply_chat_template(msgs, chat_template=template, tokenize=True,
                                         add_generation_prompt=add_generation_prompt))
    end = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}[style]
    assert chat.template_stop_tokens(tok, tok.chat_template) == (tok.token_id(end),)


def test_a_template_error_is_one_line():
    with pytest.raises(chat.ChatTemplateError, match="refused the conversation: no system"):
        chat.render_template("{{ raise_exception('no system') }}", [])
    with pytest.raises(chat.ChatTemplateError, match="does not parse"):
        chat.render_template("{% for m in messages %}", [])


def test_a_hugging_face_directory_with_only_tokenizer_json_and_a_template(tmp_path, capsys):
    """generate.py on such a directory: greedy equals transformers' generate and stops at the stop tokens that
    generation_config.json lists."""
    auto = build(tmp_path, "llama3")
    model = make_hf_llama(tmp_path, vocab_size=len(auto), hidden_size=64, layers=2, heads=4, kv_heads=2, ffn=96,
                          max_positions=128, bos=auto.bos_token_id, eos=auto.eos_token_id)
    prompt = "The king rode"
    ids = auto(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        # An explicit attention mask: BOS is id 0 here, which generate() would otherwise take for padding.
        free = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0]
    free = free[ids.shape[1]:].tolist()
    stop = free[5]  # make the sixth greedy token a stop token, as Llama 3 lists <|eot_id|> beside <|end_of_text|>
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [auto.eos_token_id, stop]}))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             eos_token_id=[auto.eos_token_id, stop], pad_token_id=0)[0][ids.shape[1]:].tolist()
    assert ref[-1] == stop and len(ref) == free.index(stop) + 1
    ckpt = lj.load_checkpoint(tmp_path)
    assert stop in ckpt.stop_tokens and auto.eos_token_id in ckpt.stop_tokens
    assert ckpt.stop_tokens[-1] == auto.convert_tokens_to_ids("<|eot_id|>")  # the template's end of turn
    out = lj.generate(ckpt.params, ckpt.config, [auto(prompt)["input_ids"]], max_new_tokens=12, temperature=0.0,
                      stop_tokens=ckpt.stop_tokens)[0]
    assert out == ref
    capsys.readouterr()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert generate_cli.main(["--checkpoint", str(tmp_path), "--prompt", prompt, "--temperature", "0",
                                  "--max-new-tokens", "12"]) == 0
    assert buf.getvalue().rstrip("\n") == prompt + auto.decode(ref[:-1])
    assert np.isfinite(ckpt.params["embed"]).all()


@pytest.mark.parametrize("template_name", ["project", "llama3", "chatml"])
def test_the_fine_tuning_mask_covers_exactly_the_assistant_replies_for_any_template(toks, template_name):
    _, _, auto, tok = toks
    template = {"project": chat.PROJECT_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE}[template_name]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"},
                {"role": "assistant", "content": "Four."}, {"role": "user", "content": "Thanks!"},
                {"role": "assistant", "content": "You are welcome 🦊"}]
    tokens, mask = chat_data.encode(tok, messages, template)
    end = chat.template_stop_tokens(tok, template)
    if template_name == "project":  # these tokenizers have no <|end|> piece: the project's template ends turns in text
        assert end == ()
    expected_text = "".join(chat.render_template(template, messages[:i + 1], False, tok.special_tokens)[
        len(chat.render_template(template, messages[:i], True, tok.special_tokens)):] for i in (2, 4))
    trained = [t for t, m in zip(tokens, mask) if m]
    if end:  # the reply and its end-of-turn token, nothing after it
        assert tok.decode(trained) == "Four." + tok.piece(end[0]) + "You are welcome 🦊" + tok.piece(end[0])
    else:
        assert tok.decode(trained) == expected_text
    # The whole sequence decodes to the rendered conversation (encoded in parts, nothing lost or added).
    assert tok.decode(tokens) == chat.render_template(template, messages, False, tok.special_tokens)
    # The same ids as apply_chat_template gives the whole conversation, and training starts at the first reply.
    assert tokens == chat.encode_conversation(tok, template, messages)
    assert tok.decode(tokens[mask.index(True):]).startswith("Four.")


def test_train_resume_and_fine_tune_with_a_tokenizer_json(tmp_path, capsys):
    """--data.tokenizer takes a Hugging Face directory; the run keeps its files; --init-from a Hugging Face
    directory with only tokenizer.json fine-tunes on dialogues rendered with its own template."""
    from llama_jax.cli import train as train_cli

    hf_dir = tmp_path / "hf"
    auto = build(hf_dir, "llama3")
    make_hf_llama(hf_dir, vocab_size=len(auto), hidden_size=32, layers=2, heads=4, kv_heads=2, ffn=64,
                  max_positions=128, bos=auto.bos_token_id, eos=auto.eos_token_id)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"{i}.txt").write_text(" ".join(TEXTS[(i + j) % len(TEXTS)] for j in range(8)))
    small = ["--model.dim=32", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2",
             "--model.ffn_dim=64", "--model.max_seq_len=64", "--train.seq_len=32", "--train.batch_size=4",
             "--train.eval_every=100", "--train.peak_flops=1e12", "--train.warmup_steps=1"]
    run = tmp_path / "run"
    args = small + [f"--model.vocab_size={len(auto)}", f"--data.tokenizer={hf_dir}", f"--data.path={corpus}",
                    "--run-dir", str(run)]
    assert train_cli.main(args + ["--train.steps=3"]) == 0
    assert (run / "tokenizer.json").is_file() and not (run / "tokenizer.model").exists()
    tok = load_tokenizer(hf_dir)
    split = token_files.open_split(run / "data", "train", tok)
    first = split.tokens[: split.doc_starts[1]].tolist() if len(split.doc_starts) > 1 else split.tokens.tolist()
    assert first[0] == auto.bos_token_id and first[-1] == auto.eos_token_id
    ckpt = lj.load_checkpoint(run)
    assert isinstance(ckpt.tokenizer, HFTokenizer) and ckpt.chat_template == LLAMA3_TEMPLATE
    assert auto.convert_tokens_to_ids("<|eot_id|>") in ckpt.stop_tokens
    assert train_cli.main(args + ["--train.steps=5", "--resume"]) == 0

    dialogues = tmp_path / "dialogues.jsonl"
    conv = {"messages": [{"role": "user", "content": "Who rode to the castle?"},
                         {"role": "assistant", "content": "The king."}]}
    dialogues.write_text((json.dumps(conv) + "\n") * 30)
    ft = tmp_path / "ft"
    assert train_cli.main(small + ["--init-from", str(hf_dir), "--data.format=chat", f"--data.path={dialogues}",
                                   "--run-dir", str(ft), "--train.steps=2", "--train.seq_len=96",
                                   "--model.max_seq_len=128"]) == 0
    split = token_files.open_split(ft / "data", "train", tok)
    n = split.doc_starts[1] if len(split.doc_starts) > 1 else split.n_tokens
    tokens, mask = split.tokens[:n].tolist(), split.target_mask[:n].tolist()
    assert tokens == ids_of(auto.apply_chat_template(conv["messages"], tokenize=True))
    assert auto.decode([t for t, m in zip(tokens, mask) if m]) == "The king.<|eot_id|>"


def test_chat_answers_two_turns_in_a_terminal(tmp_path):
    """generate.py --chat on a Hugging Face directory, driven through a pseudo-terminal as a person types."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    auto = build(tmp_path, "llama3")
    make_hf_llama(tmp_path, vocab_size=len(auto), hidden_size=32, layers=2, heads=4, kv_heads=2, ffn=64,
                  max_positions=256, bos=auto.bos_token_id, eos=auto.eos_token_id)
    ckpt = lj.load_checkpoint(tmp_path)

    def reply(history):
        prompt = chat.encode_conversation(ckpt.tokenizer, ckpt.chat_template, history, add_generation_prompt=True)
        new = lj.generate(ckpt.params, ckpt.config, [prompt], max_new_tokens=8, temperature=0.0,
                          stop_tokens=ckpt.stop_tokens)[0]
        return ckpt.tokenizer.decode([t for t in new if t not in ckpt.stop_tokens])

    history = [{"role": "user", "content": "Who rode to the castle?"}]
    first = reply(history)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second = reply(history)

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(root / "generate.py"), "--checkpoint", str(tmp_path), "--chat",
                             "--temperature", "0", "--max-new-tokens", "8"], stdin=slave, stdout=slave,
                            stderr=slave, env={**os.environ, "PYTHONPATH": str(root)})  # a terminal shows both
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout=120.0) -> str:
        nonlocal seen
        deadline = time.time() + timeout
        while marker not in seen and time.time() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)
        if marker not in seen:
            proc.kill()
            pytest.fail(f"no {marker!r} within {timeout:.0f}s; the terminal showed {seen!r}")
        before, _, seen = seen.partition(marker)
        return before.decode("utf-8", errors="replace").replace("\r\n", "\n")

    try:
        read_until(b"you> ")
        os.write(master, b"Who rode to the castle?\n")
        out1 = read_until(b"you> ")
        os.write(master, b"And then?\n")
        out2 = read_until(b"you> ")
        os.write(master, b"\x04")  # Ctrl-D ends the chat
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
    assert out1.split("assistant> ", 1)[1].rstrip("\n") == first
    assert out2.split("assistant> ", 1)[1].rstrip("\n") == second
