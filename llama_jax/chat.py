"""Chat templates, shared by `generate.py --chat` and supervised fine-tuning (data.format=chat): a checkpoint's own
Jinja template (rendered as transformers renders it), or the project's for runs trained here.

In the project's template a conversation is text with turn markers (single tokens in tokenizers it trains):

    <|system|>You are terse.<|end|>
    <|user|>Hi!<|end|>
    <|assistant|>Hello.<|end|>

i.e. for each message: "<|ROLE|>" + content + "<|end|>" + "\\n". The document starts with BOS. To reply, the model
is given the conversation so far plus "<|assistant|>" and generates until "<|end|>" (or EOS). In training, the
loss counts only the assistant's content and its "<|end|>" (what the model must learn to produce).

Dialogue files are JSONL, one conversation per line: {"messages": [{"role": "user", "content": "..."}, ...]}.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import sys
from pathlib import Path

import numpy as np

from llama_jax.data import DataError, corpus_fingerprint, iter_jsonl, token_dtype
from llama_jax.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
END = "<|end|>"
# The project's template, in the Jinja form Hugging Face checkpoints ship theirs in: one renderer for both.
PROJECT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
                    "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation in the project's template as text (without BOS); with add_generation_prompt, ready for
    the assistant's reply."""
    return render_template(PROJECT_TEMPLATE, messages, add_generation_prompt)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """A chat template compiled as transformers compiles them: a sandboxed, immutable Jinja environment with
    trim_blocks and lstrip_blocks, loop controls, a tojson that does not escape HTML, raise_exception and
    strftime_now (checkpoints' templates are untrusted code; the sandbox keeps them from reaching Python)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None


class ChatTemplateError(ValueError):
    """A chat template that does not parse or refuses a conversation; one line."""


def render_template(template: str, messages: list[dict], add_generation_prompt: bool = False,
                    special_tokens: dict | None = None, **kwargs) -> str:
    """The conversation rendered with a Jinja chat template, as transformers' apply_chat_template(tokenize=False)
    renders it. `special_tokens` gives bos_token, eos_token, ... as the template sees them (default: empty)."""
    import jinja2

    values = {"bos_token": "", "eos_token": "", "unk_token": "", "pad_token": ""}
    values.update({k: v for k, v in (special_tokens or {}).items() if v is not None})
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **values, **kwargs)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None


def encode_conversation(tok, template: str, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a rendered conversation, as apply_chat_template(tokenize=True) gives them: the special tokens
    the template writes (BOS among them) become their ids; nothing else is added."""
    text = render_template(template, messages, add_generation_prompt, getattr(tok, "special_tokens", None)
                           or {"bos_token": tok.piece(tok.bos_id), "eos_token": tok.piece(tok.eos_id)})
    return tok.encode_special(text)


def template_stop_tokens(tok, template: str) -> tuple[int, ...]:
    """The template's end-of-turn token (Llama 3's <|eot_id|>, ChatML's <|im_end|>, the project's <|end|>): the
    special token that the template writes right after an assistant's message, found by rendering one."""
    marker = "XYZZY"
    try:
        text = render_template(template, [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": marker}],
                               special_tokens=getattr(tok, "special_tokens", None))
    except ChatTemplateError:
        return ()
    tail = text[text.rfind(marker) + len(marker):] if marker in text else ""
    ids = tok.encode_special(tail.lstrip()) if tail.strip() else []
    return (ids[0],) if ids and tok.is_special(ids[0]) else ()


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


def stop_tokens(tok: Tokenizer, template: str = PROJECT_TEMPLATE) -> tuple[int, ...]:
    """The tokenizer's EOS and the template's end-of-turn token."""
    ids = [tok.eos_id, *template_stop_tokens(tok, template)]
    return tuple(dict.fromkeys(t for t in ids if t is not None and t >= 0))


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
                 utf8_errors: str = "strict", template: str = PROJECT_TEMPLATE) -> dict:
    """Like data.prepare for dialogues: train/val token files plus `{split}.mask.bin` (1 where the loss counts).
    Conversations longer than seq_len + 1 tokens are truncated by whole turns; the count is reported. An
    unchanged corpus, tokenizer and settings reuse the files already there."""
    out = Path(out_dir)
    fingerprint = {**corpus_fingerprint(paths), "tokenizer_sha256": tok.checksum, "val_fraction": val_fraction,
                   "seed": seed, "seq_len": seq_len, "utf8_errors": utf8_errors, "format": "chat",
                   "template": template}
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
        kept = truncate_turns(tok, messages, seq_len + 1, template)
        if kept is None:
            dropped += 1
            continue
        truncated += len(kept) < len(messages)
        tokens, mask = encode(tok, kept, template)
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
