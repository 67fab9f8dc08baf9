"""The console scripts a `pip install` puts on PATH (llama-jax-train, -generate, -serve, -eval, -hf, -tokenizer):
the same commands as train.py, generate.py, serve.py and the `python -m llama_jax.*` tools."""

from __future__ import annotations


def _run(module: str) -> int:
    import importlib

    from llama_jax.host_memory import keep_freed_memory

    keep_freed_memory()  # before any JAX work, as train.py / generate.py / serve.py do (host_memory.py)
    return importlib.import_module(f"llama_jax.{module}").main()


def train() -> int:
    return _run("train_cli")


def generate() -> int:
    return _run("generate_cli")


def serve() -> int:
    return _run("serve_cli")


def evaluate() -> int:
    return _run("eval")


def hf() -> int:
    return _run("hf")


def tokenizer() -> int:
    return _run("tokenizer")
