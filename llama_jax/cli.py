"""What every command-line tool of the project shares: the exit codes and one-line usage errors.

Exit codes: 0 success, 2 a user error (one line on stderr starting with "error: "), 1 a bug (a traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with no abbreviated flags and usage errors as one line: "error: ..." and exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
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


def write_atomic(path: str | Path, content: bytes) -> None:
    """Replaces a file's content atomically: a kill mid-write leaves the old file whole and no temporary file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def apply_umask(path: str | Path) -> None:
    """Gives a file the permissions a plain open() would have: some writers (tempfile, safetensors) create files
    0600, which hides a tokenizer or an exported model from the other users the umask allows."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
