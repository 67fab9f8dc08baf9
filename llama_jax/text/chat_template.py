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

from llama_jax.errors import UserError
from llama_jax.text.tokenizer import Tokenizer

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


class ChatTemplateError(ValueError, UserError):
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


def stop_tokens(tok: Tokenizer, template: str = PROJECT_TEMPLATE) -> tuple[int, ...]:
    """The tokenizer's EOS and the template's end-of-turn token."""
    ids = [tok.eos_id, *template_stop_tokens(tok, template)]
    return tuple(dict.fromkeys(t for t in ids if t is not None and t >= 0))
