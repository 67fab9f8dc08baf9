"""Data: corpora (text, JSONL, gzip) -> token files -> packed, resumable batches; conversations -> token files with
a loss mask; the default corpus."""
