"""Writing files so that a kill mid-write loses nothing and others can read what we write."""

from __future__ import annotations

import os
from pathlib import Path


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
