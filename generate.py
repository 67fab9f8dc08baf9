"""Sample from a checkpoint: `python generate.py --checkpoint runs/tiny --prompt "ROMEO:"` (or --chat).

See `python generate.py --help` and README.md. The work happens in llama_jax/generate_cli.py.
"""

import sys

from llama_jax.generate_cli import main

if __name__ == "__main__":
    sys.exit(main())
