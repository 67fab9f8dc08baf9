"""Tokenizers built from a vocabulary: Meta's tiktoken tokenizer.model against tiktoken itself and transformers'
conversion of the file, and a SentencePiece tokenizer.model whose Hugging Face directory has no tokenizer.json."""

import base64
import collections
import json
import shutil

import pytest

import llama_jax as lj
from llama_jax.text.tokenizer_build import _LLAMA3, LLAMA3_CHAT_TEMPLATE, VocabularyError, is_tiktoken
from tests.hf_util import make_hf_llama
from tests.test_data import make_docs

TEXTS = ["The king rode to the castle, and the queen   followed.", "Ünïcödé — 日本語 🙂 ok",
         "x = f(12345) + 6\n\n\tdone", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]


def train_ranks(text: str, merges: int = 120) -> dict[bytes, int]:
    """A small tiktoken vocabulary: the 256 bytes, then the most frequent adjacent pairs merged in turn (within
    space-led words), each new token ranked after those it is made of."""
    ranks = {bytes([b]): b for b in range(256)}
    words = collections.Counter(text.replace(" ", "\0 ").split("\0"))
    seqs = {w: [bytes([b]) for b in w.encode()] for w in words}
    for _ in range(merges):
        pairs = collections.Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks.setdefault(a + b, len(ranks))
        for w, seq in seqs.items():
            i, out = 0, []
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return ranks


@pytest.fixture(scope="module")
def tiktoken_file(tmp_path_factory):
    ranks = train_ranks(" ".join(make_docs(300, 5)))
    path = tmp_path_factory.mktemp("meta") / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    return path, ranks


def test_meta_tiktoken_file_gives_tiktoken_s_ids_and_transformers_conversion_s(tiktoken_file):
    import tiktoken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path, ranks = tiktoken_file
    tok = lj.load_tokenizer(path)
    names = [tok.piece(i) for i in range(len(ranks), len(ranks) + 256)]
    assert names[:2] == ["<|begin_of_text|>", "<|end_of_text|>"] and names[9] == "<|eot_id|>"
    reference = tiktoken.Encoding("test", pat_str=_LLAMA3, mergeable_ranks=ranks,
                                  special_tokens={n: len(ranks) + i for i, n in enumerate(names)})
    converted = TikTokenConverter(vocab_file=str(path), extra_special_tokens=names).converted()
    for text in TEXTS:
        ours = tok.encode_special(text)
        assert ours == reference.encode(text, allowed_special="all"), text
        assert ours == converted.encode(text).ids, text
        assert tok.decode(ours) == text
    assert tok.encode("hi", bos=True)[0] == len(ranks) == tok.bos_id  # Llama 3 adds <|begin_of_text|>
    assert tok.eos_id == len(ranks) + 9 and tok.chat_template == LLAMA3_CHAT_TEMPLATE
    assert tok.vocab_size == len(ranks) + 256


def test_tiktoken_is_told_apart_from_sentencepiece_by_content(tiktoken_file, tmp_path):
    path, _ = tiktoken_file
    assert is_tiktoken(path.read_bytes()[:256])
    sp = lj.train_tokenizer(make_docs(200, 3), 300, tmp_path / "tokenizer.model")
    assert not is_tiktoken(sp.model_bytes[:256]) and isinstance(lj.load_tokenizer(sp.model_file), lj.Tokenizer)
    bad = tmp_path / "bad" / "tokenizer.model"
    bad.parent.mkdir()
    bad.write_bytes(path.read_bytes().replace(b" 300\n", b" 9999\n"))
    with pytest.raises(VocabularyError, match=r"tokenizer.model: the ranks are not 0 \.\. "):
        lj.load_tokenizer(bad)


def test_sentencepiece_directory_without_tokenizer_json_keeps_its_template_and_bos_rule(tmp_path):
    sp = lj.train_tokenizer(make_docs(200, 3), 300, tmp_path / "sp" / "tokenizer.model")
    hf = tmp_path / "hf"
    make_hf_llama(hf, vocab_size=300)
    shutil.copy(sp.model_file, hf / "tokenizer.model")
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "add_bos_token": True,
                                                          "bos_token": "<s>", "eos_token": "</s>"}))
    ckpt = lj.load_checkpoint(hf)
    assert ckpt.chat_template == template  # read as transformers reads it (the server answers chat requests)
    assert ckpt.stop_tokens == (sp.eos_id,)
    assert ckpt.tokenizer.encode("the king", bos=True)[0] == sp.bos_id
    (hf / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # a file of its own wins
    assert lj.load_checkpoint(hf).chat_template == "{{ messages[0]['content'] }}"
    (hf / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert lj.load_checkpoint(hf).tokenizer.encode("the king", bos=True) == sp.encode("the king")
    # A run that fine-tunes from it keeps these files with its tokenizer.
    assert set(lj.load_checkpoint(hf).tokenizer.files) == {"tokenizer.model", "tokenizer_config.json",
                                                         "chat_template.jinja"}
