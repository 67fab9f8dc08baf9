"""The chat template, shared by `generate.py --chat` and supervised fine-tuning (data.format=chat).

A conversation is text with turn markers (single tokens in tokenizers this project trains):

    <|system|>You are terse.<|end|>
    <|user|>Hi!<|end|>
    <|assistant|>Hello.<|end|>

i.e. for each message: "<|ROLE|>" + content + "<|end|>" + "\\n". The document starts with BOS. To reply, the model
is given the conversation so far plus "<|assistant|>" and generates until "<|end|>" (or EOS). In training, the
loss counts only the assistant's content and its "<|end|>" (what the model must learn to produce).

Dialogue files are JSONL, one conversation per line: {"messages": [{"role": "user", "content": "..."}, ...]}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from llama_jax.data import DataError, corpus_fingerprint, iter_jsonl, token_dtype
from llama_jax.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
END = "<|end|>"


def turn_text(role: str, content: str) -> str:
    return f"<|{role}|>{content}{END}\n"


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text (without BOS); with add_generation_prompt, ready for the assistant's reply."""
    text = "".join(turn_text(m["role"], m["content"]) for m in messages)
    return text + ("<|assistant|>" if add_generation_prompt else "")


def encode(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(tokens with BOS, per-token flag "the loss counts this token as a target"). Each turn is encoded on its own
    and concatenated, so the mask boundary falls exactly between the role marker and the content."""
    tokens, train_on = [tok.bos_id], [False]
    for m in messages:
        head = tok.encode(f"<|{m['role']}|>")
        body = tok.encode(f"{m['content']}{END}")
        tail = tok.encode("\n")
        tokens += head + body + tail
        train_on += [False] * len(head) + [m["role"] == "assistant"] * len(body) + [False] * len(tail)
    return tokens, train_on


def stop_tokens(tok: Tokenizer) -> tuple[int, ...]:
    end = tok.token_id(END)
    return tuple(t for t in (tok.eos_id, end) if t is not None and t >= 0)


def read_conversations(paths, utf8_errors: str = "strict") -> list[tuple[str, list[dict]]]:
    """(source "file:line", messages) for every conversation, validated with one-line errors. The files are read
    like text corpora (gzip, UTF-8 errors named by byte offset)."""
    out = []
    for where, record in iter_jsonl(paths, utf8_errors):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise DataError(f"{where}: message {i} has no 'role'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: message {i} has unknown role {m['role']!r} "
                                f"(expected one of {', '.join(ROLES)})")
            if not isinstance(m.get("content"), str) or not m["content"].strip():
                raise DataError(f"{where}: message {i} ({m['role']}) has empty or missing 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message, nothing to learn from")
        out.append((where, messages))
    if not out:
        raise DataError(f"{paths}: no conversations found")
    return out


def conversation_texts(paths, utf8_errors: str = "strict"):
    """Rendered conversations, e.g. to train a tokenizer on a dialogue corpus."""
    for _, messages in read_conversations(paths, utf8_errors):
        yield render(messages)


def truncate_turns(tok: Tokenizer, messages: list[dict], max_tokens: int) -> list[dict] | None:
    """Drops whole turns from the end until the conversation fits (keeping at least one assistant turn), or None."""
    while messages:
        if len(encode(tok, messages)[0]) <= max_tokens and any(m["role"] == "assistant" for m in messages):
            return messages
        messages = messages[:-1]
    return None


def prepare_chat(paths, tok: Tokenizer, out_dir, *, val_fraction: float, seed: int, seq_len: int,
                 utf8_errors: str = "strict") -> dict:
    """Like data.prepare for dialogues: train/val token files plus `{split}.mask.bin` (1 where the loss counts).
    Conversations longer than seq_len + 1 tokens are truncated by whole turns; the count is reported. An
    unchanged corpus, tokenizer and settings reuse the files already there."""
    out = Path(out_dir)
    fingerprint = {**corpus_fingerprint(paths), "tokenizer_sha256": tok.checksum, "val_fraction": val_fraction,
                   "seed": seed, "seq_len": seq_len, "utf8_errors": utf8_errors, "format": "chat"}
    try:
        meta = json.loads((out / "meta.json").read_text())
        if meta.get("fingerprint") == fingerprint:
            return meta
    except (OSError, ValueError):
        pass
    (out / "meta.json").unlink(missing_ok=True)  # never left beside files being rewritten
    convs = read_conversations(paths, utf8_errors)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    rng = np.random.default_rng(seed)
    splits = {s: ([], [], []) for s in ("train", "val")}  # tokens, masks, starts
    truncated = dropped = 0
    for _, messages in convs:
        kept = truncate_turns(tok, messages, seq_len + 1)
        if kept is None:
            dropped += 1
            continue
        truncated += len(kept) < len(messages)
        tokens, mask = encode(tok, kept)
        toks, masks, starts = splits["val" if rng.random() < val_fraction else "train"]
        starts.append(sum(map(len, toks)))
        toks.append(tokens)
        masks.append(mask)
    if truncated or dropped:
        print(f"warning: {truncated} conversations truncated by whole turns to fit seq_len={seq_len}, "
              f"{dropped} dropped (their first assistant turn alone does not fit)", file=sys.stderr)
    (train_toks, train_masks, train_starts), (val_toks, val_masks, val_starts) = splits["train"], splits["val"]
    if val_fraction > 0 and not val_toks and len(train_toks) >= 2:
        # Few conversations can draw none for validation: hold out the last one (never a silent nan loss).
        val_toks.append(train_toks.pop())
        val_masks.append(train_masks.pop())
        train_starts.pop()
        val_starts.append(0)
        print(f"warning: data.val_fraction={val_fraction} drew no validation conversation; holding out the last "
              "one", file=sys.stderr)
    counts = {}
    for name, (toks, masks, starts) in splits.items():
        flat = np.asarray([t for ts in toks for t in ts], dtype)
        flat.tofile(out / f"{name}.bin")
        np.asarray([m for ms in masks for m in ms], np.uint8).tofile(out / f"{name}.mask.bin")
        np.save(out / f"{name}.docs.npy", np.asarray(starts, np.int64))
        counts[name] = {"tokens": len(flat), "documents": len(starts)}
    if counts["train"]["tokens"] == 0:
        raise DataError(f"{paths}: no conversation fits in seq_len={seq_len}")
    meta = {"tokenizer_sha256": tok.checksum, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "counts": counts, "format": "chat",
            "truncated": truncated, "dropped": dropped, "fingerprint": fingerprint}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / "meta.json")
    return meta
