"""Corpus -> token files on disk -> packed, shuffled, resumable batches.

prepare(): documents (files, directories, globs; .txt, .jsonl, .gz) are tokenized in bounded chunks on all cores
(BOS ... EOS per document) and written as token files (token_files.py: the format, the split, reuse).

Loader: windows of seq_len + 1 tokens, in a permuted order drawn from (seed, epoch); each batch carries
segment ids and per-document positions (packing) and a loss mask, and the iterator state after it.
"""

from __future__ import annotations

import glob
import gzip
import json
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llama_jax.data.token_files import DataError, TokenFile, TokenWriter, reusable, token_dtype

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")


# ---------------------------------------------------------------------------------------------------------------
# Sources.


def _kind(path: Path) -> str | None:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = Path(name).suffix.lower()
    return "text" if suffix in TEXT_SUFFIXES else "jsonl" if suffix in JSONL_SUFFIXES else None


def expand_paths(paths) -> list[Path]:
    """Files, directories (recursive: every .txt/.md/.jsonl, optionally .gz) and globs -> a sorted file list."""
    files = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = str(p)
        matches = sorted(glob.glob(p, recursive=True)) if glob.has_magic(p) else [p]
        if not matches:
            raise DataError(f"{p}: no files match this pattern")
        for m in map(Path, matches):
            if m.is_dir():
                files += sorted(f for f in m.rglob("*") if f.is_file() and _kind(f))
            elif m.is_file():
                files.append(m)
            else:
                raise DataError(f"{m}: no such file or directory")
    if not files:
        raise DataError(f"{', '.join(map(str, paths if not isinstance(paths, (str, Path)) else [paths]))}: "
                        "no .txt, .md or .jsonl files found")
    return files


def _decode(raw: bytes, path: Path, utf8_errors: str, offset: int = 0) -> tuple[str, int]:
    """UTF-8 bytes -> (text, number of replaced bytes); strict mode names the byte offset of the first error."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if utf8_errors != "replace":
            raise DataError(f"{path}: invalid UTF-8 at byte offset {offset + e.start} "
                            "(set data.utf8_errors=replace to replace such bytes and count them)") from None
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")


def _open(path: Path):
    f = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    try:
        head = f.read(8192)
    except (OSError, EOFError):
        f.close()
        raise DataError(f"{path}: cannot be read (corrupt gzip?)") from None
    if b"\x00" in head:
        f.close()
        raise DataError(f"{path}: looks like a binary file (contains NUL bytes); expected UTF-8 text")
    return f, head


@dataclass
class SourceStats:
    replaced_bytes: int = 0  # invalid UTF-8 bytes replaced (utf8_errors="replace")


def iter_documents(paths, text_field: str = "text", separator: str | None = None, utf8_errors: str = "strict",
                   stats: SourceStats | None = None) -> Iterator[tuple[str, str]]:
    """Yields (source, text) documents. A .txt file is one document, or several split by `separator`;
    each .jsonl line is a document whose text is `text_field`."""
    stats = stats if stats is not None else SourceStats()
    for path in expand_paths(paths):
        kind = _kind(path) or "text"
        f, head = _open(path)
        with f:
            if kind == "jsonl":
                for where, record in _records(f, head, path, utf8_errors, stats):
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise DataError(f"{where}: no string field {text_field!r} "
                                        "(set data.text_field to the field holding the text)")
                    yield where, record[text_field]
            elif separator:
                yield from _split_stream(f, head, path, separator, utf8_errors, stats)
            else:
                text, bad = _decode(head + f.read(), path, utf8_errors)
                stats.replaced_bytes += bad
                yield str(path), text


def iter_jsonl(paths, utf8_errors: str = "strict") -> Iterator[tuple[str, object]]:
    """Yields ("file:line", parsed JSON) for every non-blank line of the .jsonl files (gzipped or not) that
    `paths` names; a line that is not UTF-8 or not JSON fails naming its file, line and byte offset."""
    stats = SourceStats()
    for path in expand_paths(paths):
        f, head = _open(path)
        with f:
            yield from _records(f, head, path, utf8_errors, stats)


def _records(f, head: bytes, path: Path, utf8_errors: str, stats: SourceStats):
    offset = 0
    for lineno, raw in enumerate(_lines(f, head), 1):
        line_start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        text, bad = _decode(raw, path, utf8_errors, line_start)
        stats.replaced_bytes += bad
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{lineno}: not valid JSON") from None
        yield f"{path}:{lineno}", record


def _lines(f, head: bytes):
    """Lines (without the newline) of a binary stream, 4 MiB at a time."""
    buf = head
    while block := f.read(4 << 20):
        *lines, buf = (buf + block).split(b"\n")
        yield from lines
    yield from buf.split(b"\n")


def _split_stream(f, head: bytes, path: Path, separator: str, utf8_errors: str, stats: SourceStats):
    """Splits a (possibly huge) file on `separator` reading 4 MiB at a time: memory stays bounded."""
    sep = separator.encode("utf-8")
    buf, offset, n = head, 0, 0
    while True:
        block = f.read(4 << 20)
        buf += block
        parts = buf.split(sep)
        buf = parts.pop() if block else b""  # an unfinished last part waits for the next block
        for raw in parts:
            text, bad = _decode(raw, path, utf8_errors, offset)
            stats.replaced_bytes += bad
            offset += len(raw) + len(sep)
            if text.strip():
                n += 1
                yield f"{path}#{n}", text
        if not block:
            return


# ---------------------------------------------------------------------------------------------------------------
# prepare: corpus -> token files.


def _fingerprint(files: list[Path], options: dict) -> dict:
    return {"files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files], **options}


def corpus_fingerprint(paths, text_field: str = "text", separator: str | None = None) -> dict:
    """What identifies a corpus as read: its files (path, size, modification time) and how they are split."""
    return _fingerprint(expand_paths(paths), {"text_field": text_field, "separator": separator})


def prepare(paths, tokenizer, out_dir: str | Path, *, val_fraction: float = 0.05, seed: int = 0,
            text_field: str = "text", separator: str | None = None, utf8_errors: str = "strict",
            chunk_bytes: int = 8 << 20, num_threads: int | None = None, progress: bool = True,
            replace_other_tokenizer: bool = False) -> dict:
    """Tokenizes the corpus into `out_dir` (or reuses it if unchanged) and returns the metadata dict. Tokens of
    another tokenizer already there are an error, unless replace_other_tokenizer (the directory is the run's
    own)."""
    from tqdm import tqdm

    files = expand_paths(paths)
    options = {"tokenizer_sha256": tokenizer.checksum, "val_fraction": val_fraction, "seed": seed,
               "text_field": text_field, "separator": separator, "utf8_errors": utf8_errors}
    fingerprint = _fingerprint(files, options)
    meta = reusable(out_dir, fingerprint, tokenizer.checksum, replace_other_tokenizer)
    if meta is not None:
        return meta
    stats = SourceStats()
    total_bytes = sum(f.stat().st_size for f in files)
    with TokenWriter(out_dir, token_dtype(tokenizer.vocab_size), val_fraction, seed) as writer, \
            tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        for done in _chunks(iter_documents(files, text_field, separator, utf8_errors, stats), chunk_bytes):
            texts = [t for _, t in done]
            for tokens in tokenizer.encode_batch(texts, bos=True, eos=True, num_threads=num_threads):
                writer.add(tokens)
            bar.update(sum(len(t.encode("utf-8", errors="replace")) for t in texts))
        bar.update(bar.total - bar.n)  # the files' other bytes (JSON syntax, separators) are read too: 100%
        if writer.documents == 0 or writer.tokens <= 2 * writer.documents:
            raise DataError(f"{', '.join(map(str, paths if isinstance(paths, (list, tuple)) else [paths]))}: "
                            "the corpus is empty (no text in any document)")
        return writer.finish({"tokenizer_sha256": tokenizer.checksum, "vocab_size": tokenizer.vocab_size,
                              "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "corpus_bytes": total_bytes,
                              "replaced_utf8_bytes": stats.replaced_bytes, "fingerprint": fingerprint})


def _chunks(docs, chunk_bytes: int):
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc[1])
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------------------------
# Loading: token file -> batches.


@dataclass(frozen=True)
class LoaderState:
    """Where an iterator stands: the checkpoint stores this to resume on exactly the next batch."""

    seed: int
    epoch: int = 0
    position: int = 0  # batches already taken in this epoch (by this process)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    @classmethod
    def from_dict(cls, d) -> LoaderState:
        return cls(int(d["seed"]), int(d["epoch"]), int(d["position"]))


def window_batch(data: TokenFile, window_ids: np.ndarray, seq_len: int, document_masking: bool = True) -> dict:
    """Batch of windows [i*seq_len, i*seq_len + seq_len + 1). Returns numpy arrays [B, T]: tokens, targets,
    positions (restarting at each document), segment_ids (1, 2, ... per document within the row), loss_mask.
    Positions past the end of the data (a short last window) repeat its last token and are masked out."""
    starts = window_ids.astype(np.int64)[:, None] * seq_len
    full_idx = starts + np.arange(seq_len + 1)[None]
    past_end = full_idx >= data.n_tokens
    idx = np.minimum(full_idx, data.n_tokens - 1)
    window = np.asarray(data.tokens[idx.ravel()], np.int32).reshape(idx.shape)
    B, T = len(window_ids), seq_len
    if document_masking:
        doc = np.searchsorted(data.doc_starts, idx, side="right")  # [B, T+1] document index of each token
        seg = doc - doc[:, :1] + 1
        inputs_seg = seg[:, :-1]
        # where each token's document (or row) begins; a row past the end of the data starts at its last token
        first = np.maximum(data.doc_starts[doc[:, :-1] - 1], np.minimum(starts, idx[:, :1]))
        positions = (idx[:, :-1] - first).astype(np.int32)
        loss_mask = seg[:, 1:] == inputs_seg  # predicting the next document's BOS from this one's EOS is masked
    else:
        inputs_seg = np.ones((B, T), np.int32)
        positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
        loss_mask = np.ones((B, T), bool)
    if data.target_mask is not None:  # dialogues: only assistant tokens are targets
        loss_mask = loss_mask & (np.asarray(data.target_mask[idx[:, 1:].ravel()]).reshape(B, T) > 0)
    loss_mask = loss_mask & ~past_end[:, 1:]
    return {"tokens": window[:, :-1], "targets": window[:, 1:], "positions": np.ascontiguousarray(positions),
            "segment_ids": inputs_seg.astype(np.int32), "loss_mask": loss_mask.astype(np.float32)}


class Loader:
    """Shuffled windows of seq_len + 1 tokens, `batch_size` per process per step, forever (epoch after epoch).

    The global batch at each position is the same run of the permutation whatever the number of processes P;
    process p takes the p-th of P equal slices of it, so processes see disjoint data and a run on P processes
    trains on exactly the batches of a run on one. Iterating yields (batch, state_after); prefetching happens in
    a background thread."""

    def __init__(self, data: TokenFile, seq_len: int, batch_size: int, state: LoaderState,
                 document_masking: bool = True, process_index: int = 0, process_count: int = 1, prefetch: int = 4):
        self.data, self.seq_len, self.batch_size, self.state = data, seq_len, batch_size, state
        self.document_masking, self.prefetch = document_masking, prefetch
        self.process_index, self.process_count = process_index, process_count
        self.n_windows = (data.n_tokens - 1) // seq_len
        self.batches_per_epoch = self.n_windows // (batch_size * process_count)
        if self.batches_per_epoch == 0:
            raise DataError(f"the training split has {data.n_tokens} tokens: too few for one batch of "
                            f"{batch_size * process_count} x {seq_len + 1} tokens; use more text, a smaller "
                            "batch_size or a smaller seq_len")

    def window_ids(self, epoch: int, position: int) -> np.ndarray:
        order = np.random.default_rng([self.state.seed, epoch]).permutation(self.n_windows)
        first = (position * self.process_count + self.process_index) * self.batch_size
        return order[first:first + self.batch_size]

    def _produce(self, state: LoaderState):
        while True:
            ids = self.window_ids(state.epoch, state.position)
            state = LoaderState(state.seed, state.epoch, state.position + 1)
            if state.position == self.batches_per_epoch:
                state = LoaderState(state.seed, state.epoch + 1, 0)
            yield window_batch(self.data, ids, self.seq_len, self.document_masking), state

    def __iter__(self):
        if self.prefetch <= 0:
            yield from self._produce(self.state)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def worker():
            try:
                for item in self._produce(self.state):
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except Exception as e:  # surfaced in the consumer, not lost in the thread
                q.put(e)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, Exception):
                    raise item
                self.state = item[1]
                yield item
        finally:
            stop.set()


def eval_batches(data: TokenFile, seq_len: int, batch_size: int, max_batches: int,
                 document_masking: bool = True) -> Iterator[dict]:
    """The first windows of a split in order (deterministic validation). A split shorter than the batches asked
    for is covered whole: its last window is cut short and the rows past it are empty (fully masked), so batch
    shapes stay fixed and a small validation split still gives a loss."""
    n_windows = -(-(data.n_tokens - 1) // seq_len) if data.n_tokens > 1 else 0
    for b in range(min(max_batches, -(-n_windows // batch_size))):
        yield window_batch(data, np.arange(b * batch_size, (b + 1) * batch_size), seq_len, document_masking)
