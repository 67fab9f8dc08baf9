"""Pretrain or fine-tune a LLaMA-style model: `python train.py --config configs/tiny.yaml [--section.key=value]`.

See `python train.py --help` and docs/train.md. The flags are llama_jax/cli/train.py's; the run is
llama_jax/train/loop.py.
"""

from llama_jax.cli import run

if __name__ == "__main__":
    run("train")
