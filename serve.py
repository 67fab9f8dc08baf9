"""Serve a checkpoint over the OpenAI API: `python serve.py --checkpoint runs/tiny` (then see docs/serve.md).

See `python serve.py --help`. The flags are llama_jax/cli/serve.py's; the work happens in llama_jax/serve/api.py
(HTTP) and llama_jax/serve/engine.py (batching).
"""

from llama_jax.cli import run

if __name__ == "__main__":
    run("serve")
