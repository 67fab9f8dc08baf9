"""Tokenizers described by a vocabulary rather than a tokenizer.json: a GGUF file's metadata (llama.cpp's
`tokenizer.ggml.*` keys) and Meta's original Llama 3 `tokenizer.model` (tiktoken's "base64-token rank" lines).
Each becomes the files of a Hugging Face tokenizer (tokenizer.json and tokenizer_config.json), so that one class,
`HFTokenizer`, serves them as it serves a tokenizer.json from a Hugging Face directory.

Byte-level vocabularies (GGUF `gpt2`, tiktoken) are byte-level BPE with the pre-tokenizer regex their merges were
learned with; SentencePiece vocabularies (GGUF `llama`) are BPE with byte fallback and merges recovered from the
pieces' scores, as transformers builds both.
"""

from __future__ import annotations

import base64
import functools
import json

from llama_jax.errors import UserError


class VocabularyError(ValueError, UserError):
    """A vocabulary that cannot be built into a tokenizer; one line naming the file."""


# The split each byte-level vocabulary's merges were learned with, by llama.cpp's pre-tokenizer name
# (`tokenizer.ggml.pre`). GPT-2's own split is the ByteLevel pre-tokenizer's default.
_GPT2 = None
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"default": _GPT2, "gpt2": _GPT2, "gpt-2": _GPT2, "llama3": _LLAMA3, "llama-v3": _LLAMA3,
                  "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3, "dbrx": _LLAMA3, "qwen2": _QWEN2,
                  # every digit alone, then GPT-2's split (llama.cpp's smollm group; SmolLM2's own tokenizer.json)
                  **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
                                  "digits")}

# Meta's Llama 3 special tokens follow its 128,000 ranks: these ten by name, the rest reserved.
_LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte: byte-level vocabularies write their tokens in it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def _spell(raw: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in raw)


def _byte_level(vocab: dict[str, int], merges: list[tuple[str, str]], pre: str | None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    if pre is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre == "digits":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pre), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                             use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk


def _sentencepiece(tokens: list[str], scores: list[float], add_prefix_space: bool, unk: str | None):
    """A SentencePiece BPE vocabulary as `tokenizers` BPE with byte fallback: merges recovered from the pieces'
    scores (a piece made of two pieces merges them, the better its score the earlier)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [(a, b, score) for a, b in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges], fuse_unk=True, byte_fallback=True,
                              unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if add_prefix_space
                                                else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if add_prefix_space else []))
    return tk


def _finish(tk, tokens: list, special: list[int], config: dict, user_defined: list[int] = ()) -> dict[str, bytes]:
    """Marks the special tokens (and keeps user-defined ones whole), adds BOS when the config says so, and returns
    the files."""
    from tokenizers import AddedToken, processors

    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_defined])
    bos = config.get("bos_token")
    if config.get("add_bos_token") and bos is not None:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tokens.index(bos))])
    return {"tokenizer.json": tk.to_str().encode("utf-8"),
            "tokenizer_config.json": json.dumps({k: v for k, v in config.items() if v is not None}).encode("utf-8")}


def from_gguf_vocabulary(meta: dict, where: str) -> dict[str, bytes]:
    """Tokenizer files from a GGUF file's `tokenizer.*` metadata (keys without the `tokenizer.` prefix)."""
    kind, tokens = meta.get("ggml.model"), meta.get("ggml.tokens")
    if not tokens:
        raise VocabularyError(f"{where}: no tokenizer.ggml.tokens (the file has no vocabulary)")
    types = meta.get("ggml.token_type") or [1] * len(tokens)
    special = [i for i, t in enumerate(types) if t == 3]  # CONTROL
    user_defined = [i for i, t in enumerate(types) if t == 4]  # USER_DEFINED: matched whole, not special
    name = lambda key: tokens[meta[key]] if isinstance(meta.get(key), int) and 0 <= meta[key] < len(tokens) else None
    config = {"bos_token": name("ggml.bos_token_id"), "eos_token": name("ggml.eos_token_id"),
              "unk_token": name("ggml.unknown_token_id"), "pad_token": name("ggml.padding_token_id"),
              "add_bos_token": meta.get("ggml.add_bos_token", kind == "llama"),
              "chat_template": meta.get("chat_template")}
    if kind == "gpt2":
        pre = meta.get("ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise VocabularyError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
                                  f"{', '.join(sorted(PRE_TOKENIZERS))}")
        table = set(bytes_to_unicode().values())
        # Control tokens spelled outside the byte alphabet (<|im_end|>) are matched whole, as added tokens.
        vocab = {t if set(t) <= table else _spell(t.encode("utf-8")): i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in meta.get("ggml.merges") or []]
        tk = _byte_level(vocab, merges, PRE_TOKENIZERS[pre])
    elif kind == "llama":
        scores = meta.get("ggml.scores") or [0.0] * len(tokens)
        tk = _sentencepiece(tokens, scores, bool(meta.get("ggml.add_space_prefix", True)), config["unk_token"])
    else:
        raise VocabularyError(f"{where}: tokenizer.ggml.model {kind!r} is not supported; supported: gpt2 (byte-level "
                              "BPE), llama (SentencePiece)")
    return _finish(tk, tokens, special, config, user_defined)


def _bpe(ranks: dict[bytes, int], token: bytes, below: int) -> list[bytes]:
    """tiktoken's merging of `token`'s bytes with the merges ranked below `below`: the two parts that the token's
    own merge joins."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        found = [(ranks.get(a + b, below), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(found)
        if rank >= below:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise VocabularyError(f"the token {token!r} is not a merge of two tokens of lower rank")
    return parts


def is_tiktoken(head: bytes) -> bool:
    """Whether a tokenizer.model starts like Meta's tiktoken file ("base64-token rank" lines) rather than a
    SentencePiece protobuf."""
    line = head.split(b"\n", 1)[0].split(b" ")
    if len(line) != 2 or not line[1].strip().isdigit():
        return False
    try:
        base64.b64decode(line[0], validate=True)
    except ValueError:
        return False
    return True


def from_tiktoken(data: bytes, where: str) -> dict[str, bytes]:
    """Tokenizer files from Meta's original Llama 3 tokenizer.model: the ranks are the ids and the merge order
    (a token's merge is the split of it into two tokens of lower rank that ranks best), followed by Meta's 256
    special tokens, with Llama 3's pre-tokenizer regex, BOS added and its chat template."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise VocabularyError(f"{where}:{n}: expected 'base64-token rank' (a tiktoken file)") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise VocabularyError(f"{where}: the ranks are not 0 .. {len(ranks) - 1}, each once")
    merges = []
    for token, rank in ranks.items():
        if len(token) > 1:
            left, right = _bpe(ranks, token, rank)
            merges.append((rank, _spell(left), _spell(right)))
    vocab = {_spell(t): r for t, r in ranks.items()}
    tk = _byte_level(vocab, [(a, b) for _, a, b in sorted(merges)], _LLAMA3)
    names = _LLAMA3_SPECIAL + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(_LLAMA3_SPECIAL) + 2)]
    tokens = [None] * len(ranks) + names
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "add_bos_token": True,
              "chat_template": LLAMA3_CHAT_TEMPLATE}
    from tokenizers import AddedToken

    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    return _finish(tk, tokens, [], config)
