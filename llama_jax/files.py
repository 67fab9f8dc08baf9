"""Writing files so that a kill mid-write loses nothing, others can read what we write, and a place that cannot be
written to is said in one line."""

from __future__ import annotations

import os
from pathlib import Path

from llama_jax.errors import UserError


class NotWritable(OSError, UserError):
    """A directory that cannot be created or written to (read-only, under a file, no permission); one line."""


def make_dirs(path: str | Path, what: str) -> Path:
    """Creates `path` and its parents if needed; `what` names it in the error ("--run-dir", "data.cache_dir")."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise NotWritable(f"{what} {path}: cannot write there ({e.strerror or e})") from None
    return path


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
