"""Token files: the prepared form of a corpus, written by one writer for pretraining text and chat data alike.

A prepared directory holds, per split ("train", "val"):
  {split}.bin        the documents' tokens end to end (uint16, or uint32 for vocabularies over 65,536)
  {split}.docs.npy   int64 offsets of each document's first token
  {split}.mask.bin   (chat data only) uint8 per token: 1 where the loss counts it as a target
and meta.json, written last and atomically: the counts, the dtype, the tokenizer's checksum and the fingerprint of
what was prepared (files, settings), so an unchanged corpus is reused and a changed one rebuilt. Each document
draws its split from one random stream seeded by the run, so the split is a pure function of (seed, order).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama_jax.errors import UserError
from llama_jax.files import make_dirs, write_atomic

SPLITS = ("train", "val")


class DataError(ValueError, UserError):
    """Bad data (a corpus file, a conversation, a prepared directory); the message is one line naming the file."""


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def reusable(out_dir: str | Path, fingerprint: dict, checksum: str, replace_other_tokenizer: bool = False
             ) -> dict | None:
    """The metadata of `out_dir` if it already holds exactly what `fingerprint` describes, else None (and the old
    meta.json is removed, so it never sits beside files being rewritten). Tokens of another tokenizer are an error
    unless replace_other_tokenizer (the directory is the run's own)."""
    out = Path(out_dir)
    meta_file = out / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") == fingerprint:
        return meta
    if meta.get("tokenizer_sha256") != checksum and not replace_other_tokenizer:
        raise DataError(f"{out}: holds tokens from a different tokenizer (sha256 "
                             f"{str(meta.get('tokenizer_sha256'))[:12]}, configured {checksum[:12]}); delete it or "
                             "use another data.cache_dir")
    meta_file.unlink()
    return None


class TokenWriter:
    """Streams documents into a prepared directory's temporary files; `finish` makes them the directory's files.

        with TokenWriter(out, dtype, val_fraction, seed, masked=False) as w:
            for tokens in documents:
                w.add(tokens)
            meta = w.finish({...})

    Leaving the block without `finish` (an error, Ctrl-C) removes the temporary files and leaves no meta.json."""

    def __init__(self, out_dir: str | Path, dtype, val_fraction: float, seed: int, masked: bool = False,
                 unit: str = "document"):
        self.out = Path(out_dir)
        self.dtype, self.val_fraction, self.masked, self.unit = np.dtype(dtype), val_fraction, masked, unit
        self.rng = np.random.default_rng(seed)
        self.starts = {s: [] for s in SPLITS}
        self.n = dict.fromkeys(SPLITS, 0)
        self.files: dict = {}

    def _tmp(self, split: str, mask: bool = False) -> Path:
        return self.out / f"{split}{'.mask' if mask else ''}.bin.tmp"

    def __enter__(self):
        make_dirs(self.out, "data.cache_dir")
        for s in SPLITS:
            self.files[s] = open(self._tmp(s), "wb")
            if self.masked:
                self.files[s, "mask"] = open(self._tmp(s, True), "wb")
        return self

    def add(self, tokens, mask=None) -> None:
        """One document's tokens (and, for masked data, its per-token loss mask); it draws its split here."""
        split = "val" if self.rng.random() < self.val_fraction else "train"
        self.starts[split].append(self.n[split])
        self.files[split].write(np.asarray(tokens, self.dtype).tobytes())
        if self.masked:
            self.files[split, "mask"].write(np.asarray(mask, np.uint8).tobytes())
        self.n[split] += len(tokens)

    @property
    def documents(self) -> int:
        return sum(len(v) for v in self.starts.values())

    @property
    def tokens(self) -> int:
        return sum(self.n.values())

    def finish(self, meta: dict) -> dict:
        """Holds out a document if validation drew none, renames the files into place and writes meta.json (with
        the counts and dtype added to `meta`) last. Returns that metadata."""
        self._close()
        if self.val_fraction > 0 and not self.starts["val"]:
            self._hold_out_last()
        counts = {}
        for s in SPLITS:
            np.save(self.out / f"{s}.docs.npy", np.asarray(self.starts[s], np.int64))
            for mask in (False, True) if self.masked else (False,):
                self._tmp(s, mask).replace(self.out / f"{s}{'.mask' if mask else ''}.bin")
            counts[s] = {"tokens": self.n[s], "documents": len(self.starts[s])}
        meta = {**meta, "dtype": self.dtype.name, "counts": counts}
        write_atomic(self.out / "meta.json", json.dumps(meta, indent=1).encode())
        self.files = {}
        return meta

    def _hold_out_last(self) -> None:
        """A corpus of few documents can draw none for validation: its last training document is held out instead
        (a smaller split, never a silent 'validation loss nan')."""
        starts = self.starts["train"]
        if len(starts) < 2:
            print(f"warning: one {self.unit}; no validation split (data.val_fraction={self.val_fraction})",
                  file=sys.stderr)
            return
        start = starts.pop()
        for mask, size in ((False, self.dtype.itemsize), (True, 1)) if self.masked else ((False, self.dtype.itemsize),):
            with open(self._tmp("train", mask), "rb+") as f:
                f.seek(start * size)
                tail = f.read()
                f.truncate(start * size)
            self._tmp("val", mask).write_bytes(tail)
        self.starts["val"], self.n["val"] = [0], self.n["train"] - start
        self.n["train"] = start
        print(f"warning: data.val_fraction={self.val_fraction} drew no validation {self.unit} from "
              f"{len(starts) + 1}; holding out the last one ({self.n['val']} tokens)", file=sys.stderr)

    def _close(self) -> None:
        for f in self.files.values():
            f.close()

    def __exit__(self, *exc) -> None:
        self._close()
        if self.files:  # not finished: no temporary file is left behind
            for s in SPLITS:
                for mask in (False, True):
                    self._tmp(s, mask).unlink(missing_ok=True)


@dataclass(frozen=True)
class TokenFile:
    tokens: np.ndarray  # memmap [n_tokens]
    doc_starts: np.ndarray  # [n_docs] offsets into tokens, ascending
    target_mask: np.ndarray | None = None  # memmap [n_tokens] uint8: 1 where a token counts as a target (chat)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def open_split(out_dir: str | Path, split: str, tokenizer=None) -> TokenFile:
    out = Path(out_dir)
    meta_file = out / "meta.json"
    if not meta_file.is_file():
        raise DataError(f"{out}: not a prepared dataset (no meta.json; run prepare again)")
    meta = json.loads(meta_file.read_text())
    if tokenizer is not None and meta["tokenizer_sha256"] != tokenizer.checksum:
        raise DataError(f"{meta_file}: tokens were prepared with a different tokenizer (sha256 "
                             f"{meta['tokenizer_sha256'][:12]}) than the configured one ({tokenizer.checksum[:12]})")
    n = meta["counts"][split]["tokens"]
    tokens = np.memmap(out / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(n,)) if n else np.zeros(0)
    mask_file = out / f"{split}.mask.bin"
    mask = np.memmap(mask_file, dtype=np.uint8, mode="r", shape=(n,)) if n and mask_file.is_file() else None
    return TokenFile(tokens, np.load(out / f"{split}.docs.npy"), mask)
