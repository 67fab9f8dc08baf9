"""python -m llama_jax.examples.dialogues: write the synthetic dialogue set of docs/finetune.md."""

from __future__ import annotations

from llama_jax.cli.common import ArgumentParser
from llama_jax.examples.dialogues import write


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m llama_jax.examples.dialogues",
                       description="Write a small synthetic dialogue set for fine-tuning (JSONL).")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--n", type=int, default=3000, help="conversations")
    p.add_argument("--seed", type=int, default=0)
    try:
        args = p.parse_args(argv)
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else 2
    out = write(args.out, args.n, args.seed)
    print(f"wrote {args.n} conversations to {out}")
    return 0
