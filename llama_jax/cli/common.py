"""What every command-line tool of the project shares: the argument parser, the config flags, exit codes and
one-line usage errors, and quieting the libraries' own reports of a failure.

Exit codes: 0 success, 2 a user error (a `UserError`: one line on stderr starting with "error: "), 1 a bug (a
traceback), 128 + N when stopped by signal N.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from llama_jax.config import SECTIONS, field_comments

USER_ERROR = 2
CHECKPOINT_HELP = "a training run directory, a Hugging Face Llama directory, a GGUF file or a llama2.c .bin file"


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
