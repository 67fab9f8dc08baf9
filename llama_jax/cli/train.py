"""The command behind `train.py` (and `llama-jax-train`): parse the flags, call `loop.run`, map errors to exit codes
(0 done, 2 user error, 128 + signal when stopped by one)."""

from __future__ import annotations

import dataclasses
import sys

from llama_jax.cli import common as cli
from llama_jax.cli.common import add_config_flags, overrides_from_args
from llama_jax.config import SECTIONS
from llama_jax.errors import UserError
from llama_jax.train.loop import run
from llama_jax.train.runtime import Interrupted, Signals, end_distributed, start_distributed


def parse_args(argv=None):
    p = cli.ArgumentParser(
        prog="train.py", description="Pretrain or fine-tune a LLaMA-style model.",
        epilog="Every config field below can be given as --section.key VALUE or --section.key=VALUE; values are "
               "YAML scalars ('--data.separator=\\n\\n' is two newlines).")
    p.add_argument("--config", help="a YAML file with model/data/train sections, or an installed preset by name "
                                    "(tiny, stories15M, stories110M, llama3.2-1b, llama2-7b, llama3-8b: configs/)")
    p.add_argument("--run-dir", help="directory for checkpoints, metrics and the tokenizer (default: runs/<config>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir")
    p.add_argument("--init-from", help="start from these weights: a run directory, a Hugging Face Llama directory, "
                                       "a GGUF file or a llama2.c .bin file (same as --train.init_from)")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=4,tensor=1 (same as --train.mesh)")
    p.add_argument("--coordinator", help="multi-host: address:port of process 0 (calls jax.distributed.initialize)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")
    p.add_argument("--distributed-timeout", type=int, default=300,
                   help="multi-host: seconds to wait for all processes to connect, and to shut down together")
    p.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="multi-host: seconds without a heartbeat after which a process counts as dead")
    add_config_flags(p)
    args, rest = p.parse_known_args(argv)
    for item in rest:
        key = item[2:].split("=")[0] if item.startswith("--") else ""
        section, dot, name = key.partition(".")
        if dot and section in SECTIONS:
            known = ", ".join(f.name for f in dataclasses.fields(SECTIONS[section]))
            p.error(f"unknown key {key} (known: {known})")
        p.error(f"unrecognized argument {item!r}")
    overrides = overrides_from_args(args)
    if args.mesh is not None:
        overrides.append(f"train.mesh={args.mesh}")
    if args.init_from is not None:
        overrides.append(f"train.init_from={args.init_from}")
    multi = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in multi) and not all(v is not None for v in multi):
        p.error("--coordinator, --num-processes and --process-id go together")
    if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        p.error(f"--process-id {args.process_id} must be in [0, --num-processes={args.num_processes})")
    return args, overrides


def main(argv=None) -> int:
    signals = Signals()
    cli.quiet_library_noise()
    try:
        args, overrides = parse_args(argv)
        if args.coordinator:
            start_distributed(args)
        run(args.config, overrides, args.run_dir, args.resume, signals)
        if args.coordinator:
            end_distributed(signals)
    except SystemExit as e:  # argparse: --help (0) or a usage error, already printed
        return e.code if isinstance(e.code, int) else cli.USER_ERROR
    except UserError as e:
        return cli.fail(str(e))
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    finally:
        signals.restore()
    return 0
