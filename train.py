"""Pretrain or fine-tune a LLaMA-style model: `python train.py --config configs/tiny.yaml [--section.key=value]`.

See `python train.py --help` and docs/train.md. The flags are llama_jax/train_cli.py's; the run is llama_jax/loop.py.
"""

import sys

from llama_jax.host_memory import keep_freed_memory
from llama_jax.train_cli import main

if __name__ == "__main__":
    keep_freed_memory()  # before any JAX work: CPU steps stop page-faulting their buffers in (host_memory.py)
    sys.exit(main())
