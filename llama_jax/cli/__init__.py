"""The command lines, and only they: flags, exit codes and one-line errors. Nothing outside this folder parses
arguments; the library raises `UserError` and each command here turns it into "error: ..." and exit 2.

    train.py / llama-jax-train          cli/train.py       (the run itself: train/loop.py)
    generate.py / llama-jax-generate    cli/generate.py
    serve.py / llama-jax-serve          cli/serve.py       (the server: serve/)
    python -m llama_jax.eval            cli/eval.py        (the measures: eval.py)
    python -m llama_jax.hf              cli/hf.py          (the converter: checkpoints/hf.py)
    python -m llama_jax.tokenizer       cli/tokenizer.py   (the trainer: text/tokenizer.py)

Every command keeps JAX's compiled programs in a persistent cache, so that the second start of a tool on the same
model skips compiling: `~/.cache/llama_jax/jax` (under $XDG_CACHE_HOME when set). LLAMA_JAX_COMPILATION_CACHE names
another directory, or `off` disables it; JAX's own JAX_COMPILATION_CACHE_DIR, when set, is left as it is.

The console scripts a `pip install` puts on PATH are the functions at the bottom of this file.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from pathlib import Path

CACHE_VARIABLE = "LLAMA_JAX_COMPILATION_CACHE"


def compilation_cache_dir() -> Path | None:
    """Where the commands keep compiled programs (None: disabled, or JAX_COMPILATION_CACHE_DIR decides)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    chosen = os.environ.get(CACHE_VARIABLE, "")
    if chosen.lower() in ("off", "0", "false", "no", "none"):
        return None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(chosen) if chosen else base / "llama_jax" / "jax"


def use_compilation_cache() -> None:
    """Turns on JAX's persistent compilation cache in compilation_cache_dir() (before anything is compiled). A
    directory that cannot be created leaves the cache off: it only saves time."""
    where = compilation_cache_dir()
    if where is None:
        return
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(where))
    # Cache the small programs too (a prefill bucket compiles in well under JAX's default 1 s).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


class _Loading:
    """Records SIGINT/SIGTERM while a command and JAX load (JAX's import swallows a Ctrl-C that lands in it, and a
    default SIGTERM would end the process without a word)."""

    def __init__(self):
        self.signum = None
        self._old = {s: signal.signal(s, self._record) for s in (signal.SIGINT, signal.SIGTERM)}

    def _record(self, signum, frame):
        self.signum = self.signum or signum

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def main(command: str, argv=None) -> int:
    """Runs llama_jax.cli.<command>.main(argv) and returns its exit code (128 + N when signal N stopped it while
    it was loading)."""
    loading = _Loading() if threading.current_thread() is threading.main_thread() else None
    from llama_jax.host_memory import keep_freed_memory

    keep_freed_memory()  # before any JAX work: CPU steps stop page-faulting their buffers in (host_memory.py)
    use_compilation_cache()
    module = importlib.import_module(f"llama_jax.cli.{command}")
    if loading is not None:
        loading.restore()
        if loading.signum is not None:
            print(f"stopped by {signal.Signals(loading.signum).name} while starting; nothing was done",
                  file=sys.stderr)
            return 128 + loading.signum
    from llama_jax.cli.common import stop_on_signals, stopped

    stop = stop_on_signals()
    try:
        return module.main(argv)
    except KeyboardInterrupt as e:  # a command that does not report a stop itself
        return stopped(e)
    finally:
        stop.restore()


def run(command: str) -> None:
    """Runs a command with the process's arguments and exits with its code (train.py, python -m llama_jax.hf, ...)."""
    sys.exit(_finished(main(command)))


def _finished(code: int) -> int:
    """The command has ended and its exit code is decided: a stop signal while the process tears down (JAX's
    distributed shutdown, a late preemption notice to one of several processes) changes nothing and no longer
    kills it with a different code."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
    return code


def _script(command: str):
    return lambda: _finished(main(command))


# Not named like the modules: importing llama_jax.cli.train binds that name on this package.
train_command = _script("train")
generate_command = _script("generate")
serve_command = _script("serve")
eval_command = _script("eval")
hf_command = _script("hf")
tokenizer_command = _script("tokenizer")
