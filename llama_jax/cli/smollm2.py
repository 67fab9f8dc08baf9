"""python -m llama_jax.examples.smollm2: print the path of the SmolLM2-135M-Instruct GGUF file (or how to get it)."""

from __future__ import annotations

from llama_jax.cli.common import ArgumentParser, fail
from llama_jax.errors import UserError
from llama_jax.examples import smollm2


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m llama_jax.examples.smollm2",
                       description=f"Print the path of {smollm2.FILE} ({smollm2.INSTALL}).")
    try:
        p.parse_args(argv)
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else 2
    try:
        print(smollm2.path())
    except UserError as e:
        return fail(str(e))
    return 0
