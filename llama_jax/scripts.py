"""The console scripts a `pip install` puts on PATH (llama-jax-train, -generate, -serve, -eval, -hf, -tokenizer):
the same commands as train.py, generate.py, serve.py and the `python -m llama_jax.*` tools."""

from __future__ import annotations


def _command(module: str):
    """The console script that runs llama_jax.<module>.main()."""

    def run() -> int:
        import importlib

        from llama_jax.host_memory import keep_freed_memory

        keep_freed_memory()  # before any JAX work, as train.py / generate.py / serve.py do (host_memory.py)
        return importlib.import_module(f"llama_jax.{module}").main()

    return run


train = _command("train_cli")
generate = _command("generate_cli")
serve = _command("serve_cli")
evaluate = _command("eval")
hf = _command("hf")
tokenizer = _command("tokenizer")
