"""Sample from a checkpoint: `python generate.py --checkpoint runs/tiny --prompt "ROMEO:"` (or --chat).

See `python generate.py --help` and docs/generate.md. The work happens in llama_jax/cli/generate.py.
"""

from llama_jax.cli import run

if __name__ == "__main__":
    run("generate")
