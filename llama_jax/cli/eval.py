"""python -m llama_jax.eval (llama-jax-eval): perplexity of text files and accuracy on choice tasks; the
measures themselves are llama_jax/eval.py's."""

from __future__ import annotations

import json

from llama_jax.cli.common import ADAPTER_HELP, CHECKPOINT_HELP, ArgumentParser, fail, quiet_library_noise, stopped
from llama_jax.errors import UserError


def main(argv=None) -> int:
    quiet_library_noise()
    p = ArgumentParser(prog="python -m llama_jax.eval", description="Measure a checkpoint.")
    sub = p.add_subparsers(dest="command", required=True)
    common = ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True,
                        help=CHECKPOINT_HELP)
    common.add_argument("--step", type=int, help="which checkpoint step of a run directory (default: the newest)")
    common.add_argument("--adapter", help=ADAPTER_HELP)
    common.add_argument("--tokenizer", help="a tokenizer to use instead of the checkpoint's own")
    common.add_argument("--batch-tokens", type=int, default=8192, help="tokens scored per batch")
    common.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's)")
    common.add_argument("--json", action="store_true", help="print the results as one JSON object")
    pp = sub.add_parser("perplexity", parents=[common], help="perplexity and bits per byte of text files")
    pp.add_argument("--data", nargs="+", required=True, help="text or JSONL files, directories or globs")
    pp.add_argument("--window", type=int, help="tokens per scoring window (default: the model's context; the "
                                               "training run's seq_len scores a model as it was trained)")
    pp.add_argument("--stride", type=int, help="tokens of context each window keeps from the one before (default: "
                                               "half a window)")
    pp.add_argument("--text-field", default="text", help="the JSONL field holding the text")
    pp.add_argument("--separator", help="split text files into documents at this string (default: a file is one)")
    pc = sub.add_parser("choice", parents=[common], help="accuracy on multiple-choice questions (JSONL)")
    pc.add_argument("--tasks", required=True, help="a JSONL file: {context, choices, answer} per line")
    pc.add_argument("--delimiter", default=" ", help="put between the context and each choice")
    pc.add_argument("--limit", type=int, help="score only the first N questions")
    try:
        args = p.parse_args(argv)
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else 2

    from llama_jax.checkpoints.load import load_checkpoint
    from llama_jax.eval import EvalError, choice, perplexity, read_tasks

    try:
        if args.batch_tokens < 1:
            raise EvalError(f"--batch-tokens={args.batch_tokens} must be >= 1")
        if args.command == "choice":
            if args.limit is not None and args.limit < 1:
                raise EvalError(f"--limit={args.limit} must be >= 1")
            tasks = read_tasks(args.tasks)[:args.limit]
        ckpt = load_checkpoint(args.checkpoint, args.step, args.tokenizer, adapter=args.adapter)
        config = ckpt.config.replace(dtype=args.dtype or ckpt.config.dtype)
        if args.command == "perplexity":
            window = args.window or config.max_seq_len
            if not 2 <= window <= config.max_seq_len:
                raise EvalError(f"--window={window} must be in [2, {config.max_seq_len}] (the model's context)")
            if args.stride is not None and not 1 <= args.stride < window:
                raise EvalError(f"--stride={args.stride} must be in [1, {window}) (the window)")
            out = perplexity(ckpt.params, config, ckpt.tokenizer, args.data, window=window, stride=args.stride,
                             batch_tokens=args.batch_tokens, text_field=args.text_field, separator=args.separator,
                             progress=not args.json)
            out["checkpoint"] = ckpt.source
            if args.json:
                print(json.dumps(out))
            else:
                print(f"{ckpt.source}")
                print(f"{'file':<40} {'tokens':>10} {'nll/token':>10} {'perplexity':>11} {'bits/byte':>10}")
                for r in [*out["files"], out["total"]]:
                    print(f"{r['path'][-40:]:<40} {r['tokens']:>10} {r['nll']:>10.4f} {r['perplexity']:>11.3f} "
                          f"{r['bits_per_byte']:>10.4f}")
        else:
            out = choice(ckpt.params, config, ckpt.tokenizer, tasks, args.delimiter, args.batch_tokens)
            if args.json:
                print(json.dumps({"checkpoint": ckpt.source, "tasks": str(args.tasks), **out}))
            else:
                print(f"{ckpt.source}; {args.tasks}: {out['n']} questions")
                print(f"acc {out['acc']:.4f}   acc_norm {out['acc_norm']:.4f}")
    except UserError as e:
        return fail(str(e))
    except KeyboardInterrupt as e:
        return stopped(e)
    return 0
