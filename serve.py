"""Serve a checkpoint over the OpenAI API: `python serve.py --checkpoint runs/tiny` (then see README.md, Serve).

See `python serve.py --help`. The work happens in llama_jax/server.py (HTTP) and llama_jax/engine.py (batching).
"""

import sys

from llama_jax.host_memory import keep_freed_memory
from llama_jax.server import main

if __name__ == "__main__":
    keep_freed_memory()  # before any JAX work (host_memory.py)
    sys.exit(main())
