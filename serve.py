"""Serve a checkpoint over the OpenAI API: `python serve.py --checkpoint runs/tiny` (then see docs/serve.md).

See `python serve.py --help`. The flags are llama_jax/serve_cli.py's; the work happens in llama_jax/server.py (HTTP)
and llama_jax/engine.py (batching).
"""

import sys

from llama_jax.host_memory import keep_freed_memory
from llama_jax.serve_cli import main

if __name__ == "__main__":
    keep_freed_memory()  # before any JAX work (host_memory.py)
    sys.exit(main())
