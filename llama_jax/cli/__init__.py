"""The command lines, and only they: flags, exit codes and one-line errors. Nothing outside this folder parses
arguments; the library raises `UserError` and each command here turns it into "error: ..." and exit 2.

    train.py / llama-jax-train          cli/train.py       (the run itself: train/loop.py)
    generate.py / llama-jax-generate    cli/generate.py
    serve.py / llama-jax-serve          cli/serve.py       (the server: serve/)
    python -m llama_jax.eval            cli/eval.py        (the measures: eval.py)
    python -m llama_jax.hf              cli/hf.py          (the converter: checkpoints/hf.py)
    python -m llama_jax.tokenizer       cli/tokenizer.py   (the trainer: text/tokenizer.py)

The console scripts a `pip install` puts on PATH are the functions at the bottom of this file.
"""

from __future__ import annotations

import importlib
import sys


def main(command: str, argv=None) -> int:
    """Runs llama_jax.cli.<command>.main(argv) and returns its exit code."""
    from llama_jax.host_memory import keep_freed_memory

    keep_freed_memory()  # before any JAX work: CPU steps stop page-faulting their buffers in (host_memory.py)
    return importlib.import_module(f"llama_jax.cli.{command}").main(argv)


def run(command: str) -> None:
    """Runs a command with the process's arguments and exits with its code (train.py, python -m llama_jax.hf, ...)."""
    sys.exit(main(command))


def _script(command: str):
    return lambda: main(command)


# Not named like the modules: importing llama_jax.cli.train binds that name on this package.
train_command = _script("train")
generate_command = _script("generate")
serve_command = _script("serve")
eval_command = _script("eval")
hf_command = _script("hf")
tokenizer_command = _script("tokenizer")
