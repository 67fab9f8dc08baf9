"""Where a new request goes in the engine's pool of slots, and what it can start from: pure functions over what the
engine knows of its slots (engine.py keeps that and calls these).

Slots are handed out low first, because a decode step runs the smallest power of two of slots that covers the
highest one in use. A slot keeps the keys/values of its last request after it ends, so a prompt that starts with
the same tokens (a chat's earlier turns, a shared system prompt) can start after them: prefix reuse.
"""

from __future__ import annotations

import numpy as np

MIN_COPIED = 16  # a prefix held by another slot is copied over (all its rows, a fixed shape) from this many tokens


def rows_for(occupied, step_sizes) -> int:
    """The decode step that covers these slots: the smallest step size beyond the highest."""
    return next(n for n in step_sizes if n > max(occupied))


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens a and b share, at most `limit`."""
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


def place(prompt: list[int], held: dict[int, list[int]], busy, last_used: dict[int, int], max_batch: int,
          step_sizes, reuse: bool = True) -> tuple[int, int, int]:
    """(slot, source, reused): the free slot a prompt goes to, and the slot whose keys/values hold its first
    `reused` tokens (the last prompt token is always prefilled, for its logits). `held`: per slot, the tokens whose
    keys/values it holds; `busy`: the slots in use; `last_used`: when each free slot's request ended.

    The slot is chosen among the free ones that keep the decode step as small as the lowest free slot would (a
    higher one would make every step run more rows): the one holding the prefix if it is among them, else the
    least recently used. A prefix held elsewhere (a running request, a free slot out of that range) is copied
    over from `source`; source == slot means nothing is copied."""
    free = [s for s in range(max_batch) if s not in busy]
    rows = rows_for(set(busy) | {free[0]}, step_sizes)
    candidates = [s for s in free if s < rows]
    best, reused = None, 0
    if reuse:
        for s, tokens in held.items():
            n = common_prefix(tokens, prompt, len(prompt) - 1)
            if n > reused:
                best, reused = s, n
    if best in candidates:
        return best, best, reused
    slot = min(candidates, key=lambda s: last_used.get(s, -1))
    if best is not None and reused >= MIN_COPIED:
        return slot, best, reused
    return slot, slot, 0
