"""The command behind `serve.py` (and `llama-jax-serve`): check the flags, refuse a busy port, load the checkpoint,
compile the engine, then serve until Ctrl-C / SIGTERM."""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

from llama_jax.cli import common as cli
from llama_jax.cli.common import ADAPTER_HELP, CHECKPOINT_HELP, ArgumentParser, fail, quiet_library_noise, stopped
from llama_jax.errors import UserError


def main(argv=None) -> int:
    """serve.py: load a checkpoint, compile, then serve until Ctrl-C / SIGTERM (which ends the requests in flight,
    then exits 0)."""
    quiet_library_noise()
    p = ArgumentParser(prog="serve.py", description="An OpenAI-compatible server (completions, chat) over a "
                                                    "checkpoint, batching concurrent requests.")
    p.add_argument("--checkpoint", required=True,
                   help=CHECKPOINT_HELP)
    p.add_argument("--tokenizer", help="a tokenizer to use instead of the checkpoint's own")
    p.add_argument("--step", type=int, help="which checkpoint step of a run directory (default: the newest)")
    p.add_argument("--adapter", help=ADAPTER_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (KV-cache slots)")
    p.add_argument("--max-len", type=int, help="tokens per request, prompt included (default: the context)")
    p.add_argument("--queue", type=int, default=256, help="requests that may wait for a slot before 429s")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="the most prompt tokens prefilled in one piece; while others decode, a chunk is cut to "
                        "what takes one of their steps")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="prefill every prompt from its start (by default a prompt that begins with tokens a slot "
                        "still holds, such as a chat's earlier turns, starts after them)")
    p.add_argument("--model-name", help="the model's id in the API (default: the checkpoint's file name)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype (default: float32 on a CPU, the checkpoint's elsewhere)")
    try:
        args = p.parse_args(argv)
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else 2
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-len", args.max_len, 2),
                             ("--queue", args.queue, 1), ("--port", args.port, 0),
                             ("--prefill-chunk", args.prefill_chunk, 1)):
        if value is not None and value < low:
            return fail(f"{flag}={value} must be >= {low}")
    try:  # refuse a busy port before spending minutes loading and compiling
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((args.host, args.port))
    except OSError as e:
        return fail(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror})")

    import jax
    import uvicorn

    from llama_jax.checkpoints.load import load_checkpoint
    from llama_jax.config import ConfigError
    from llama_jax.serve.api import Server
    from llama_jax.serve.engine import Engine

    log = lambda line: print(line, file=sys.stderr, flush=True)
    try:
        ckpt = load_checkpoint(args.checkpoint, args.step, args.tokenizer, adapter=args.adapter)
        dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else ckpt.config.dtype)
        if args.max_len is not None and args.max_len > ckpt.config.max_seq_len:
            raise ConfigError(f"--max-len={args.max_len} exceeds the model's context of {ckpt.config.max_seq_len}")
        log(f"loaded {ckpt.source}; compiling for {args.max_batch} slots of "
            f"{args.max_len or ckpt.config.max_seq_len} tokens")
        engine = Engine(ckpt.params, ckpt.config.replace(dtype=dtype), ckpt.tokenizer, stop_tokens=ckpt.stop_tokens,
                        max_batch=args.max_batch, max_len=args.max_len, queue_size=args.queue,
                        prefill_chunk=args.prefill_chunk, prefix_reuse=not args.no_prefix_reuse, log=log)
        engine.start()
    except UserError as e:
        return fail(str(e))
    except KeyboardInterrupt as e:
        return stopped(e, " while starting")
    name = args.model_name or Path(args.checkpoint).resolve().name.removesuffix(".bin")
    server = Server(engine, name, ckpt.chat_template)
    config = uvicorn.Config(server.app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=30, lifespan="off")
    log(f"serving {name!r} on http://{args.host}:{args.port}/v1 (Ctrl-C stops); "
        f"the playground page: http://{args.host}:{args.port}/")
    # uvicorn stops on SIGINT/SIGTERM once the requests in flight have ended, then raises the signal again for
    # the handler that was there before it: ours, so that a requested stop exits 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn handing our handler back the Ctrl-C it stopped on: the stop asked for
        cli.stop_handled()
    engine.stop(drain=False, timeout=10)
    log("stopped")
    return 0
