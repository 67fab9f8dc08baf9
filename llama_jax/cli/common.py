"""What every command-line tool of the project shares: the argument parser, the config flags, exit codes and
one-line usage errors, and quieting the libraries' own reports of a failure.

Exit codes: 0 success, 2 a user error (a `UserError`: one line on stderr starting with "error: "), 1 a bug (a
traceback), 128 + N when stopped by signal N.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path

from llama_jax.config import SECTIONS, field_comments

USER_ERROR = 2
CHECKPOINT_HELP = "a training run directory, a Hugging Face Llama directory, a GGUF file or a llama2.c .bin file"
ADAPTER_HELP = "a Hugging Face PEFT LoRA adapter directory to apply to --checkpoint (a LoRA run applies its own)"


class _DefaultsFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to a flag's help unless the help already says its default or there is none to say (a
    None or False default, or one the help describes in words)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def program(script: str) -> str:
    """The name usage lines show: the console script's (llama-jax-train) when it is the one running, else
    `script` (train.py, python -m llama_jax.eval)."""
    name = Path(sys.argv[0]).name
    return name if name.startswith("llama-jax-") else script


class ArgumentParser(argparse.ArgumentParser):
    """argparse with no abbreviated flags and usage errors as one line: "error: ..." and exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        if "prog" in kwargs:
            kwargs["prog"] = program(kwargs["prog"])
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(USER_ERROR)


def quiet_library_noise() -> None:
    """For the command-line tools: a failure reaches the user as our one line, so the libraries' own reports of
    it are silenced: Orbax logs each failure as an absl ERROR with a traceback (and warns about every damaged
    step it lists), and a failed asynchronous save leaves asyncio futures that report themselves at exit."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    hook = sys.unraisablehook

    def quiet(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
                unraisable.exc_value)):
            hook(unraisable)

    sys.unraisablehook = quiet


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread as Ctrl-C is (see `stop_on_signals`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class stop_on_signals:
    """While active, SIGINT and SIGTERM raise `Stopped` in the main thread, so that a tool with nothing to save
    (generate, eval, export) ends at once through its `except KeyboardInterrupt` with one line and 128 + N
    (`stopped`), and SIGTERM no longer kills it without a word. Python runs the handler between two of its own
    instructions: a long XLA call (compiling, a jitted step) finishes first. Where Python drops the exception (the
    handler ran inside a garbage-collection callback or a __del__: "Exception ignored in ..."), the signal is sent
    again until a `Stopped` is caught (`stopped` or `stop_handled` says so). Training uses its own handler, which
    never raises (train/runtime.py): it has a checkpoint to save."""

    active = None  # the instance in force (signal handlers are per process)

    def __init__(self):
        self._old, self.signum, self.handled = {}, None, False
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._raise) for s in (signal.SIGINT, signal.SIGTERM)}
            stop_on_signals.active = self
            self._hook = sys.unraisablehook
            sys.unraisablehook = self._dropped

    def _dropped(self, unraisable):
        if not isinstance(unraisable.exc_value, Stopped):  # a dropped Stopped is asked again, not reported
            self._hook(unraisable)

    def _raise(self, signum, frame):
        self.signum, self.handled = signum, False
        timer = threading.Timer(0.25, self._again)
        timer.daemon = True
        timer.start()
        raise Stopped(signum)

    def _again(self):
        if not self.handled and self._old:
            os.kill(os.getpid(), self.signum)

    def restore(self) -> None:
        if self._old:
            sys.unraisablehook = self._hook
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}
        if stop_on_signals.active is self:
            stop_on_signals.active = None


def stop_handled() -> None:
    """A `Stopped` was caught and acted on (the tool ends, or a chat ends as Ctrl-C asks): no need to repeat it."""
    if stop_on_signals.active is not None:
        stop_on_signals.active.handled = True


def stopped(error: KeyboardInterrupt, doing: str = "") -> int:
    """Says which signal stopped the tool (Ctrl-C when the interpreter's own handler raised) and returns 128 + N."""
    stop_handled()
    signum = getattr(error, "signum", signal.SIGINT)
    print(f"\nstopped by {signal.Signals(signum).name}{doing}", file=sys.stderr)
    return 128 + signum


def fail(message: str) -> int:
    """Prints a user error and returns its exit code (for `return fail(...)` in a main())."""
    print(f"error: {message}", file=sys.stderr)
    return USER_ERROR


def add_config_flags(parser) -> None:
    """Adds `--section.key VALUE` (or `=VALUE`) for every config field to an argparse parser, one group per
    section, with the field's type, default and comment as help. `overrides_from_args` reads them back."""
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} settings (override a preset: --{section}.KEY VALUE)")
        comments = field_comments(cls)
        for field in dataclasses.fields(cls):
            default = field.default
            text = comments.get(field.name, "")
            group.add_argument(f"--{section}.{field.name}", dest=f"{section}.{field.name}", default=argparse.SUPPRESS,
                               metavar=str(field.type).replace(" ", ""),
                               help=f"{text} (default: {default!r})".replace("%", "%%"))


def overrides_from_args(args) -> list[str]:
    """The `section.key=value` strings of the config flags given on the command line."""
    return [f"{key}={value}" for key, value in vars(args).items() if "." in key and key.split(".")[0] in SECTIONS]
