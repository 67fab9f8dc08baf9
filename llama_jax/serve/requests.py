"""What a generation request is and what it gives back, as the engine takes and emits them (api.py turns OpenAI
requests into these and these into OpenAI responses), and the stop-string matching on the text as it grows."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass
class Request:
    """One generation. `emit(event)` is called from the engine's thread for every piece of output."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: drawn by the engine
    stop: tuple[str, ...] = ()  # stop strings, matched on the text
    logprobs: int | None = None  # None: none; K: the chosen token's log-probability and K alternatives
    echo: bool = False  # also score the prompt (its tokens' log-probabilities), sent before the first token
    emit: Callable[[Event], None] = lambda event: None
    id: str = ""


@dataclasses.dataclass
class Event:
    """A piece of a request's output. Tokens come with their text (possibly "" while a multi-byte character or a
    possible stop string is held back); the last event has finish_reason "stop" or "length" (or "cancelled",
    "error" with `error` set)."""

    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    prompt_logprobs: list | None = None  # echo: [(token, logprob or None, [(id, logprob)...])] per prompt token
    finish_reason: str | None = None
    error: str | None = None

    def extend(self, e: Event) -> None:
        """Appends a later event of the same request (collecting a whole output)."""
        self.text += e.text
        self.tokens += e.tokens
        self.logprobs += e.logprobs
        self.top_logprobs += e.top_logprobs
        self.prompt_logprobs = self.prompt_logprobs or e.prompt_logprobs
        self.finish_reason, self.error = e.finish_reason or self.finish_reason, e.error or self.error


def find_stop(text: str, stops) -> int | None:
    """Where the earliest stop string begins in text, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def partial_stop(text: str, stops) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string (held back: the next token
    may complete it)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
