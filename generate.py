"""Sample from a checkpoint: `python generate.py --checkpoint runs/tiny --prompt "ROMEO:"` (or --chat).

See `python generate.py --help` and docs/generate.md. The work happens in llama_jax/generate_cli.py.
"""

import sys

from llama_jax.generate_cli import main
from llama_jax.host_memory import keep_freed_memory

if __name__ == "__main__":
    keep_freed_memory()  # before any JAX work: CPU steps stop page-faulting their buffers in (host_memory.py)
    sys.exit(main())
