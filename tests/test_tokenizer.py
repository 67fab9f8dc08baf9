import subprocess
import sys

import pytest

from llama_jax.text.tokenizer import Tokenizer, TokenizerError, train_tokenizer
from llama_jax.text.tokenizer_json import ConversionError, sentencepiece_to_json

CORPUS = ("The quick brown fox jumps over the lazy dog. " * 20 + "\n"
          "今天天气真好，我们去公园散步吧。\n" "Emoji: 😀🎉🚀 and numbers 12345 67890.\n"
          "    indented   code  with\ttabs\n\n\n") * 30
TEXTS = ["Hello, world!", "今天天气真好", "emoji 😀🎉 ✨", "  runs   of spaces\n\n\nand newlines\t\ttabs ",
         "digits 0123456789 3.14159", " leading space", "", "ünïcödé ÅÆØ", "a\u200bb zero width", "\r\n windows"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer([CORPUS], 400, tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.mark.parametrize("text", TEXTS)
def test_exact_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_ids_and_chat_symbols_are_single_tokens(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3) and tok.vocab_size == 400
    for symbol in ("<|user|>", "<|assistant|>", "<|end|>"):
        assert len(tok.encode(symbol)) == 1 and tok.token_id(symbol) == tok.encode(symbol)[0]
    assert tok.token_id("not-a-piece") is None
    assert tok.encode("hi", bos=True, eos=True)[0] == 1 and tok.encode("hi", bos=True, eos=True)[-1] == 2


def test_batch_encoding_equals_single(tok):
    assert tok.encode_batch(TEXTS, num_threads=2) == [tok.encode(t) for t in TEXTS]
    assert tok.decode_batch(tok.encode_batch(TEXTS)) == TEXTS


def test_piece_bytes_reassemble_the_text(tok):
    text = "fox 今天 😀"
    assert b"".join(tok.piece_bytes(i) for i in tok.encode(text)).decode("utf-8") == text


def test_unigram_and_loading_existing_model(tok, tmp_path):
    words = " ".join("".join(chr(97 + (i * 7 + j * 3) % 26) for j in range(3 + i % 5)) for i in range(3000))
    uni = train_tokenizer([CORPUS, words], 400, tmp_path / "u.model", model_type="unigram")
    assert uni.decode(uni.encode(TEXTS[3])) == TEXTS[3]
    with pytest.raises(ConversionError, match="only SentencePiece BPE"):  # the export then writes no tokenizer.json
        sentencepiece_to_json(uni.model_bytes)
    again = Tokenizer(tok.model_file)
    assert again.checksum == tok.checksum and again.encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_errors_are_one_line(tmp_path):
    with pytest.raises(TokenizerError, match="vocab size 100000 is too large for this corpus"):
        train_tokenizer(["tiny corpus"], 100000, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()
    with pytest.raises(TokenizerError, match="missing.model: tokenizer model not found"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="junk.model: not a SentencePiece model"):
        Tokenizer(tmp_path / "junk.model")


def test_command_line_trains_a_model(tmp_path):
    (tmp_path / "a.txt").write_text(CORPUS)
    out = tmp_path / "tok" / "tokenizer.model"
    result = subprocess.run([sys.executable, "-m", "llama_jax.tokenizer", "train", "--input", str(tmp_path / "*.txt"),
                             "--vocab-size", "380", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert Tokenizer(out).vocab_size == 380
    bad = subprocess.run([sys.executable, "-m", "llama_jax.tokenizer", "train", "--input", str(tmp_path / "nope"),
                          "--vocab-size", "380", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such file "
                                                                       "or directory"]


@pytest.mark.parametrize("dummy_prefix", [False, True])
def test_tokenizer_json_encodes_and_decodes_as_the_sentencepiece_model(tok, tmp_path, dummy_prefix):
    """The export's tokenizer.json: the same ids as SentencePiece on every text (whitespace runs, CJK, emoji in
    bytes, chat markers), for the models trained here and for a Llama-2-style one that adds a dummy prefix."""
    import sentencepiece as spm

    from llama_jax.text.tokenizer import HFTokenizer

    if dummy_prefix:  # as Meta trained Llama 2's: a "▁" before the text, whitespace runs not kept as pieces
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(CORPUS.split("\n")), model_prefix=str(tmp_path / "m"), vocab_size=400,
            model_type="bpe", byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, minloglevel=2)
        tok = Tokenizer(tmp_path / "m.model")
    (tmp_path / "tokenizer.json").write_text(sentencepiece_to_json(tok.model_bytes), encoding="utf-8")
    as_json = HFTokenizer(tmp_path / "tokenizer.json")
    texts = TEXTS + [CORPUS[i:i + 97] for i in range(0, len(CORPUS), 331)] + ["<|user|>hi<|end|>\n", "x  y   z"]
    for text in texts:
        ids = tok.encode(text)
        assert as_json.encode(text) == ids and as_json.tk.encode(text).ids == [tok.bos_id, *ids], text
        assert as_json.decode(ids) == tok.decode(ids), text
