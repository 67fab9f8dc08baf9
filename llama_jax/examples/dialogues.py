"""Writes a small synthetic dialogue set for fine-tuning (docs/finetune.md), generated here from templates.

    python -m llama_jax.examples.dialogues --out data/dialogues.jsonl [--n 3000] [--seed 0]

The tasks are ones a 1M-parameter model can pick up in a few hundred steps: greetings, adding small numbers,
repeating a word, and naming the colour of a few things, one to three turns per conversation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
COLOURS = {"the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a lemon": "yellow",
           "blood": "red", "an orange": "orange", "a violet": "purple"}
WORDS = ["king", "crown", "rose", "storm", "night", "honour", "sword", "love", "ghost", "river"]
SYSTEMS = [None, None, "You are a helpful assistant.", "Answer briefly."]


def _turn(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.choice(["Hello!", "Hi there.", "Good morning!", "Hey."]), "Hello! How can I help you?"
    if kind == 1:
        a, b = rng.randrange(6), rng.randrange(5)
        return f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is " \
                                                             f"{NUMBERS[a + b]}."
    if kind == 2:
        w = rng.choice(WORDS)
        return f"Say {w} three times.", f"{w} {w} {w}"
    thing = rng.choice(sorted(COLOURS))
    return f"What colour is {thing}?", f"{thing.capitalize()} is {COLOURS[thing]}."


def conversations(n: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(n):
        messages = []
        system = rng.choice(SYSTEMS)
        if system:
            messages.append({"role": "system", "content": system})
        for _ in range(rng.randint(1, 3)):
            user, assistant = _turn(rng)
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        yield {"messages": messages}


def write(out, n: int = 3000, seed: int = 0) -> Path:
    """Writes n conversations to the JSONL file `out` (its folder is created) and returns its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for conv in conversations(n, seed):
            f.write(json.dumps(conv) + "\n")
    return out


if __name__ == "__main__":  # the command line is llama_jax/cli/dialogues.py
    from llama_jax.cli import run

    run("dialogues")
