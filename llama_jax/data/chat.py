"""Conversations -> token files for supervised fine-tuning (data.format=chat): JSONL dialogues read and
checked, rendered with a chat template, encoded with a per-token loss mask (only the replies count), and written
as the token files training reads.

Dialogue files are JSONL, one conversation per line: {"messages": [{"role": "user", "content": "..."}, ...]}.
"""

from __future__ import annotations

import sys

from llama_jax.data.corpus import corpus_fingerprint, iter_jsonl
from llama_jax.data.token_files import DataError, TokenWriter, reusable, token_dtype
from llama_jax.text.chat_template import PROJECT_TEMPLATE, ChatTemplateError, render, render_template, stop_tokens
from llama_jax.text.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


def encode(tok: Tokenizer, messages: list[dict], template: str = PROJECT_TEMPLATE) -> tuple[list[int], list[bool]]:
    """(token ids of the conversation rendered with `template`, per token: "the loss counts this token as a
    target"), for any template. Each reply is found in the rendering as what the template adds to the conversation
    before it (rendered with the generation prompt, what generate.py --chat feeds) when the reply is appended. The
    loss counts the reply's tokens up to and including the template's end-of-turn token (not the newline some
    templates write after it). A tokenizers tokenizer encodes the whole text and places the replies by its
    tokens' character offsets (byte-level BPE may merge across a boundary encoded in parts); a SentencePiece one
    encodes the parts (its templates' boundaries fall on single-piece markers)."""
    special = getattr(tok, "special_tokens", None) or {"bos_token": tok.piece(tok.bos_id),
                                                       "eos_token": tok.piece(tok.eos_id)}
    ends = set(stop_tokens(tok, template))
    spans, done = [], ""  # (start, end) of each reply in the rendered text
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_template(template, messages[:i], True, special)
        after = render_template(template, messages[:i + 1], False, special)
        if not (before.startswith(done) and after.startswith(before)):
            raise ChatTemplateError("the chat template does not render a conversation as the conversation before "
                                    "each reply followed by the reply, so the reply's tokens cannot be masked")
        spans.append((len(before), len(after)))
        done = after
    full = render_template(template, messages, False, special)
    if not full.startswith(done):
        raise ChatTemplateError("the chat template renders a whole conversation differently from its prefixes")
    if hasattr(tok, "encode_with_offsets"):
        tokens, offsets = tok.encode_with_offsets(full)
        in_reply = [next((k for k, (a, b) in enumerate(spans) if a <= start < b), None) for start, _ in offsets]
    else:
        cuts = sorted({0, len(full), *[x for span in spans for x in span]})
        tokens, in_reply = [], []
        for a, b in zip(cuts, cuts[1:]):
            part = tok.encode_special(full[a:b])
            k = next((k for k, span in enumerate(spans) if span == (a, b)), None)
            tokens += part
            in_reply += [k] * len(part)
    train_on, ended = [], set()
    for t, k in zip(tokens, in_reply):
        train_on.append(k is not None and k not in ended)
        if k is not None and t in ends:
            ended.add(k)  # what follows the end-of-turn token (a newline) is not the model's to produce
    return tokens, train_on


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


def truncate_turns(tok: Tokenizer, messages: list[dict], max_tokens: int, template: str = PROJECT_TEMPLATE
                   ) -> list[dict] | None:
    """Drops whole turns from the end until the conversation fits (keeping at least one assistant turn), or None."""
    while messages:
        if len(encode(tok, messages, template)[0]) <= max_tokens and any(m["role"] == "assistant" for m in messages):
            return messages
        messages = messages[:-1]
    return None


def prepare_chat(paths, tok: Tokenizer, out_dir, *, val_fraction: float, seed: int, seq_len: int,
                 utf8_errors: str = "strict", template: str = PROJECT_TEMPLATE,
                 replace_other_tokenizer: bool = False) -> dict:
    """Like corpus.prepare for dialogues: the token files plus `{split}.mask.bin` (1 where the loss counts).
    Conversations longer than seq_len + 1 tokens are truncated by whole turns; the count is reported. An
    unchanged corpus, tokenizer and settings reuse the files already there."""
    fingerprint = {**corpus_fingerprint(paths), "tokenizer_sha256": tok.checksum, "val_fraction": val_fraction,
                   "seed": seed, "seq_len": seq_len, "utf8_errors": utf8_errors, "format": "chat",
                   "template": template}
    meta = reusable(out_dir, fingerprint, tok.checksum, replace_other_tokenizer)
    if meta is not None:
        return meta
    convs = read_conversations(paths, utf8_errors)
    truncated = dropped = 0
    with TokenWriter(out_dir, token_dtype(tok.vocab_size), val_fraction, seed, masked=True,
                     unit="conversation") as writer:
        for _, messages in convs:
            kept = truncate_turns(tok, messages, seq_len + 1, template)
            if kept is None:
                dropped += 1
                continue
            truncated += len(kept) < len(messages)
            writer.add(*encode(tok, kept, template))
        if truncated or dropped:
            print(f"warning: {truncated} conversations truncated by whole turns to fit seq_len={seq_len}, "
                  f"{dropped} dropped (their first assistant turn alone does not fit)", file=sys.stderr)
        if writer.n["train"] == 0:
            raise DataError(f"{paths}: no conversation fits in seq_len={seq_len}")
        return writer.finish({"tokenizer_sha256": tok.checksum, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                              "eos_id": tok.eos_id, "format": "chat", "truncated": truncated, "dropped": dropped,
                              "fingerprint": fingerprint})
