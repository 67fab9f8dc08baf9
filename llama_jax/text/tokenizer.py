"""SentencePiece tokenizers: train one on a corpus, or load any existing `tokenizer.model` (LLaMA-1/2 ones too).

Trained models use byte fallback and no normalisation, so decode(encode(text)) == text for any Unicode text.

    python -m llama_jax.tokenizer train --input corpus/*.txt --vocab-size 4096 --out tok/tokenizer.model
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from llama_jax.errors import UserError
from llama_jax.files import apply_umask, make_dirs

# Turn markers of the chat template (text/chat_template.py); trained tokenizers make each one a single piece.
CHAT_SYMBOLS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class TokenizerError(ValueError, UserError):
    """A tokenizer that cannot be trained or loaded; the message is one line naming the file."""


class Tokenizer:
    """A loaded SentencePiece model. Stateless apart from the model itself; safe to share across threads."""

    CONFIG_FILES = ("tokenizer_config.json", "chat_template.jinja")  # read beside a Hugging Face tokenizer.model

    def __init__(self, model_file: str | Path, model_bytes: bytes | None = None, config_files: dict | None = None):
        """From a tokenizer.model file (with the tokenizer_config.json and chat_template.jinja beside it, as a
        Llama-2-era Hugging Face directory has them), or from `model_bytes` and `config_files` (name -> bytes, as a
        checkpoint stores them)."""
        self.model_file = Path(model_file)
        if model_bytes is None:
            if not self.model_file.is_file():
                raise TokenizerError(f"{self.model_file}: tokenizer model not found")
            model_bytes = self.model_file.read_bytes()
            beside = self.model_file.parent
            config_files = {n: (beside / n).read_bytes() for n in self.CONFIG_FILES if (beside / n).is_file()}
        self.model_bytes, self.config_files = model_bytes, dict(config_files or {})
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_bytes)
        except (RuntimeError, OSError):
            raise TokenizerError(f"{self.model_file}: not a SentencePiece model") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id, self.unk_id = self.sp.pad_id(), self.sp.unk_id()
        self.checksum = hashlib.sha256(self.model_bytes).hexdigest()  # what the ids depend on
        config = _read_config(self.config_files, self.model_file.parent)
        self.chat_template = _template(config, self.config_files)  # None: the model file carries none
        self.add_bos = config.get("add_bos_token", True) is not False
        piece = lambda i: self.sp.IdToPiece(i) if i >= 0 else None
        self.special_tokens = {"bos_token": _token_content(config.get("bos_token")) or piece(self.bos_id),
                               "eos_token": _token_content(config.get("eos_token")) or piece(self.eos_id)}

    @property
    def files(self) -> dict[str, bytes]:
        return {"tokenizer.model": self.model_bytes, **self.config_files}

    def save(self, directory: str | Path) -> None:
        for name, content in self.files.items():
            (Path(directory) / name).write_bytes(content)

    @classmethod
    def from_bytes(cls, model_bytes: bytes, name: str | Path = "tokenizer.model") -> Tokenizer:
        """A tokenizer from a serialized model (as a checkpoint stores it); `name` is what messages call it."""
        return cls(name, model_bytes)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids; with bos, BOS first unless the tokenizer_config.json beside the model says add_bos_token false
        (as transformers does)."""
        return self.sp.Encode(text, add_bos=bos and self.add_bos, add_eos=eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False,
                     num_threads: int | None = None) -> list[list[int]]:
        """Encodes a list of texts on `num_threads` threads (default: all CPU cores)."""
        return self.sp.Encode(texts, add_bos=bos and self.add_bos, add_eos=eos,
                              num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; ids past the tokenizer's pieces (a model's padded vocabulary rows) decode to nothing."""
        return self.sp.Decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def piece_bytes(self, token: int) -> bytes:
        """The raw bytes a single token stands for (byte-fallback pieces give one byte; '▁' gives a space; an id
        past the tokenizer's pieces gives none)."""
        if not 0 <= int(token) < self.vocab_size:
            return b""
        piece = self.sp.IdToPiece(int(token))
        if self.sp.IsByte(int(token)):
            return bytes([int(piece[3:5], 16)])
        if self.sp.IsControl(int(token)) or self.sp.IsUnknown(int(token)):
            return b""
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_id(self, piece: str) -> int | None:
        """The id of a piece that the model has as a single token (e.g. a chat symbol), else None."""
        i = self.sp.PieceToId(piece)
        return None if i == self.unk_id and piece != self.sp.IdToPiece(self.unk_id) else i

    def piece(self, token: int) -> str | None:
        return self.sp.IdToPiece(int(token)) if 0 <= int(token) < self.vocab_size else None

    def encode_special(self, text: str) -> list[int]:
        """Encodes text in which the BOS and EOS pieces (<s>, </s>) may be written out, as a rendered chat
        template writes them: those become their ids (SentencePiece alone would spell them as text)."""
        specials = {self.piece(i): i for i in (self.bos_id, self.eos_id) if i >= 0}
        pattern = "(" + "|".join(map(re.escape, specials)) + ")" if specials else None
        ids = []
        for part in re.split(pattern, text) if pattern else [text]:
            ids += [specials[part]] if part in specials else self.encode(part) if part else []
        return ids

    def is_special(self, token: int) -> bool:
        """Control pieces (BOS, EOS) and the chat symbols this project's tokenizers have as single pieces."""
        return self.sp.IsControl(int(token)) or self.piece(token) in CHAT_SYMBOLS


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (`tokenizer.json`, as Llama 3, SmolLM and most current checkpoints ship
    it) with the settings of its `tokenizer_config.json`: the same interface as `Tokenizer`. `encode(bos=True)`
    adds what the tokenizer's own post-processor adds (Llama 3's adds <|begin_of_text|>; a Llama-2-style
    conversion adds <s> when its add_bos_token says so), as transformers' AutoTokenizer does; special (added)
    tokens written in the text are single ids."""

    FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

    def __init__(self, path: str | Path, files: dict[str, bytes] | None = None):
        """From a directory holding tokenizer.json (and tokenizer_config.json, chat_template.jinja if present), a
        tokenizer.json file beside them, or `files` (name -> bytes, as a checkpoint stores them; `path` then only
        names them in messages)."""

        import tokenizers

        path = Path(path)
        directory = path if path.is_dir() else path.parent
        self.model_file = path / "tokenizer.json" if path.is_dir() else path
        if files is None:
            if not self.model_file.is_file():
                raise TokenizerError(f"{self.model_file}: tokenizer.json not found")
            files = {"tokenizer.json": self.model_file.read_bytes()}
            files |= {n: (directory / n).read_bytes() for n in self.FILES[1:] if (directory / n).is_file()}
        self.files = files
        self.model_bytes = files["tokenizer.json"]
        try:
            self.tk = tokenizers.Tokenizer.from_str(self.model_bytes.decode("utf-8"))
        except Exception as e:  # the Rust library's own exception for a file it cannot parse
            raise TokenizerError(f"{self.model_file}: not a tokenizers JSON file ({str(e)[:120]})") from None
        self.config = _read_config(files, directory)
        self.special_tokens = {name: _token_content(self.config.get(name))
                               for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        ids = {name: self.tk.token_to_id(t) if t else None for name, t in self.special_tokens.items()}
        self.bos_id, self.eos_id = _or_minus_one(ids["bos_token"]), _or_minus_one(ids["eos_token"])
        self.pad_id, self.unk_id = _or_minus_one(ids["pad_token"]), _or_minus_one(ids["unk_token"])
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.checksum = hashlib.sha256(b"".join(files[n] for n in sorted(files))).hexdigest()
        self.chat_template = _template(self.config, files)

    def save(self, directory: str | Path) -> None:
        """Writes its files (tokenizer.json, tokenizer_config.json, chat_template.jinja) into `directory`."""
        for name, content in self.files.items():
            (Path(directory) / name).write_bytes(content)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=bos).ids
        return ids + [self.eos_id] if eos and self.eos_id >= 0 else ids

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False,
                     num_threads: int | None = None) -> list[list[int]]:
        """Encodes a list of texts on all CPU cores (the Rust library's thread pool)."""
        tail = [self.eos_id] if eos and self.eos_id >= 0 else []
        return [e.ids + tail for e in self.tk.encode_batch(texts, add_special_tokens=bos)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids, special tokens included (as AutoTokenizer.decode); ids past the vocabulary (a model's
        padded rows) decode to nothing."""
        return self.tk.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=False)

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def token_id(self, piece: str) -> int | None:
        return self.tk.token_to_id(piece)

    def piece(self, token: int) -> str | None:
        return self.tk.id_to_token(int(token))

    def encode_special(self, text: str) -> list[int]:
        """Encodes a rendered chat template: the special tokens written in it are their ids; nothing is added."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """encode_special's ids and each token's (start, end) character span in `text`."""
        encoding = self.tk.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def is_special(self, token: int) -> bool:
        added = self.tk.get_added_tokens_decoder().get(int(token))
        return bool(added is not None and added.special)


def _read_config(files: dict[str, bytes], directory: Path) -> dict:
    """tokenizer_config.json's settings (special tokens, add_bos_token, chat_template), or {} without one."""
    if "tokenizer_config.json" not in files:
        return {}
    try:
        config = json.loads(files["tokenizer_config.json"].decode("utf-8"))
    except ValueError as e:
        raise TokenizerError(f"{directory / 'tokenizer_config.json'}: not valid JSON ({e})") from None
    return config if isinstance(config, dict) else {}


def _template(config: dict, files: dict[str, bytes]) -> str | None:
    """The chat template as transformers picks it: chat_template.jinja, else tokenizer_config.json's (the default
    one of several named templates)."""
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].decode("utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _token_content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _or_minus_one(i: int | None) -> int:
    return -1 if i is None else i


class TextStream:
    """Tokens in, text out as it becomes complete, for either backend: a character split over byte pieces (byte
    fallback, or byte-level BPE as Llama 3's) appears once its last byte arrives. Each step decodes only the few
    ids since the last complete text (with one id before them, so that a piece's leading space is kept)."""

    def __init__(self, tok, context: Iterable[int] = ()):
        """`context`: the ids before the first streamed one (the prompt's last few), so that the first new piece
        decodes as it continues them (SentencePiece drops the leading space of a text's first piece)."""
        self.tok, self.ids = tok, [int(t) for t in context]
        self.prefix, self.read = 0, len(self.ids)

    def add(self, token: int) -> str:
        """The new text that `token` completes ('' while a character is still incomplete)."""
        self.ids.append(int(token))
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete character (or nothing new): wait for the next token
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """Whatever is left (an incomplete character at the end decodes as U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


def tokenizer_from_files(files: dict[str, bytes], where: str | Path):
    """The tokenizer a checkpoint stored as its files (see `files` of either backend)."""
    if "tokenizer.json" in files:
        return HFTokenizer(Path(where) / "tokenizer.json", files)
    return Tokenizer(Path(where) / "tokenizer.model", files["tokenizer.model"],
                     {n: files[n] for n in Tokenizer.CONFIG_FILES if n in files})


def load_tokenizer(path: str | Path):
    """A tokenizer from a `tokenizer.model` (SentencePiece, or Meta's Llama 3 tiktoken file: told apart by their
    content), a `tokenizer.json`, or a directory holding either (tokenizer.json preferred, as transformers'
    AutoTokenizer prefers its fast tokenizer)."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path)
        if not (path / "tokenizer.model").is_file():
            raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model")
        path = path / "tokenizer.model"
    if path.suffix == ".json":
        return HFTokenizer(path)
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(256)
        from llama_jax.text.tokenizer_build import from_tiktoken, is_tiktoken

        if is_tiktoken(head):
            return HFTokenizer(path.with_name("tokenizer.json"), from_tiktoken(path.read_bytes(), str(path)))
    return Tokenizer(path)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out: str | Path, model_type: str = "bpe",
                    user_symbols: tuple[str, ...] = CHAT_SYMBOLS, max_sentences: int = 2_000_000,
                    num_threads: int | None = None) -> Tokenizer:
    """Trains a SentencePiece model on an iterable of texts (each split into lines) and writes it to `out`.

    Identity normalisation, byte fallback, digits split and whitespace kept as is make encoding lossless. Every
    character gets a piece of its own when the alphabet fits in half the vocabulary (left after the special and
    byte pieces); a larger one (Chinese, Japanese) keeps its most frequent characters as pieces and spells the
    rarer ones in bytes. Ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3 <pad>, then `user_symbols`, bytes and learned
    pieces. Errors reading the texts (a corpus file's bad line) propagate as they are, naming the file."""
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model_type={model_type!r} is not one of bpe, unigram")
    out = Path(out)
    least = 4 + len(user_symbols) + 256 + 1  # <unk> <s> </s> <pad>, the symbols, the bytes, and one learned piece
    if vocab_size < least:
        raise TokenizerError(f"vocab size {vocab_size} is too small: the 4 special pieces, {len(user_symbols)} chat "
                             f"symbols and 256 byte pieces leave no room for a learned one (at least {least})")
    # Read before training: an error in the texts then surfaces as itself, not as sentencepiece's own message,
    # and the alphabet is known for choosing the character coverage. (SentencePiece holds every sentence in
    # memory while it trains anyway.)
    lines, chars = _sample_lines(texts, max_sentences)
    if not lines:
        raise TokenizerError("no text to train a tokenizer on")
    rare = _rare_characters(chars, vocab_size - 4 - len(user_symbols) - 256)
    if rare:
        drop = dict.fromkeys(map(ord, rare))
        lines = [t for t in (line.translate(drop) for line in lines) if t.strip()]
    make_dirs(out.parent, "the tokenizer's folder")
    tmp = tempfile.NamedTemporaryFile(dir=out.parent, suffix=".model.tmp", delete=False)
    try:
        with tmp:
            spm.SentencePieceTrainer.Train(
                sentence_iterator=iter(lines), model_writer=tmp, vocab_size=vocab_size, model_type=model_type,
                character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
                allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
                user_defined_symbols=list(user_symbols), unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
        apply_umask(tmp.name)  # tempfile creates 0600
        os.replace(tmp.name, out)  # atomic: a crash never leaves a half-written tokenizer.model
    except RuntimeError as e:
        raise TokenizerError(_training_error(str(e), vocab_size)) from None
    finally:
        Path(tmp.name).unlink(missing_ok=True)  # on any exit path, Ctrl-C included
    return Tokenizer(out)


def _sample_lines(texts: Iterable[str], max_sentences: int) -> tuple[list[str], collections.Counter]:
    lines, chars = [], collections.Counter()
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                lines.append(line)
                chars.update(line)
                if len(lines) >= max_sentences:
                    return lines, chars
    return lines, chars


def _rare_characters(chars: collections.Counter, budget: int) -> set[str]:
    """The characters that get no piece of their own: none when the alphabet fits in half of the budget of
    pieces (half, so merges keep room), else all but the most frequent half-budget. They are left out of the
    training text, and encoding spells them in bytes (SentencePiece itself refuses a character coverage below
    0.98, which for Chinese still asks for thousands of pieces)."""
    keep = max(budget // 2, 1)
    if len(chars) <= keep:
        return set()
    return {c for c, _ in chars.most_common()[keep:]}


def _training_error(message: str, vocab_size: int) -> str:
    msg = message.strip().splitlines()[-1] if message.strip() else "training failed"
    if "Vocabulary size too high" in msg or "Vocabulary size is too high" in msg:
        limit = msg.rsplit("<=", 1)[-1].strip(" .")
        return f"vocab size {vocab_size} is too large for this corpus (at most {limit}); use more text or a " \
               "smaller model.vocab_size"
    if "sentences_.empty()" in msg:  # every character was left to bytes: no text remained to learn pieces from
        return f"vocab size {vocab_size} is too small for this corpus: too few pieces remain for its characters " \
               "after the special and byte pieces; use a larger vocabulary"
    if "smaller than required_chars" in msg:
        need = msg.split(" vs ")[-1].split(".")[0]
        return f"vocab size {vocab_size} is too small: the special pieces, 256 bytes and the characters need " \
               f"at least {need}"
    return f"sentencepiece training failed: {msg}"
