import gzip
import json

import numpy as np
import pytest

from llama_jax.data import corpus as data
from llama_jax.data import token_files
from llama_jax.data.corpus import DataError, Loader, LoaderState
from llama_jax.text.tokenizer import train_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def make_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(5, 60))) + "\n" for _ in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(make_docs(200, 1), 320, tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture
def corpus(tmp_path):
    docs = make_docs(40)
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i, d in enumerate(docs[:20]):
        (root / f"d{i:02d}.txt").write_text(d)
    with open(root / "sub" / "more.jsonl", "w") as f:
        for d in docs[20:30]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    with gzip.open(root / "sub" / "z.jsonl.gz", "wt") as f:
        for d in docs[30:]:
            f.write(json.dumps({"text": d}) + "\n")
    return root, docs


def test_sources_files_dirs_globs_jsonl_gz(corpus):
    root, docs = corpus
    texts = [t for _, t in data.iter_documents(root)]
    assert sorted(texts) == sorted(docs)
    assert len(list(data.iter_documents(str(root / "d0*.txt")))) == 10


def test_separator_splits_a_file_into_documents(tmp_path):
    (tmp_path / "a.txt").write_text("one\n<|doc|>\ntwo\n<|doc|>\n\n<|doc|>three")
    docs = [t for _, t in data.iter_documents(tmp_path / "a.txt", separator="<|doc|>")]
    assert docs == ["one\n", "\ntwo\n", "three"]


def test_token_file_equals_direct_encoding(corpus, tok, tmp_path):
    root, _ = corpus
    meta = data.prepare(root, tok, tmp_path / "prep", val_fraction=0.2, progress=False)
    expected = [tok.encode(t, bos=True, eos=True) for _, t in data.iter_documents(root)]
    got = []
    for split in ("train", "val"):
        tf = token_files.open_split(tmp_path / "prep", split, tok)
        assert tf.tokens.dtype == np.uint16
        bounds = list(tf.doc_starts) + [tf.n_tokens]
        got += [list(map(int, tf.tokens[a:b])) for a, b in zip(bounds, bounds[1:])]
    assert sorted(got) == sorted(expected)
    assert meta["counts"]["val"]["documents"] > 0 and meta["counts"]["train"]["documents"] > 0
    assert meta["tokenizer_sha256"] == tok.checksum and meta["vocab_size"] == 320


def test_split_is_deterministic_and_prepare_reuses_files(corpus, tok, tmp_path):
    root, _ = corpus
    a = data.prepare(root, tok, tmp_path / "a", val_fraction=0.3, seed=7, progress=False)
    b = data.prepare(root, tok, tmp_path / "b", val_fraction=0.3, seed=7, progress=False)
    assert a["counts"] == b["counts"]
    assert (tmp_path / "a" / "val.bin").read_bytes() == (tmp_path / "b" / "val.bin").read_bytes()
    mtime = (tmp_path / "a" / "train.bin").stat().st_mtime_ns
    data.prepare(root, tok, tmp_path / "a", val_fraction=0.3, seed=7, progress=False)
    assert (tmp_path / "a" / "train.bin").stat().st_mtime_ns == mtime


def test_corpus_larger_than_chunk_size(corpus, tok, tmp_path):
    root, _ = corpus
    big = data.prepare(root, tok, tmp_path / "big", chunk_bytes=1 << 30, progress=False)
    small = data.prepare(root, tok, tmp_path / "small", chunk_bytes=50, progress=False)
    assert big["counts"] == small["counts"]
    assert (tmp_path / "big" / "train.bin").read_bytes() == (tmp_path / "small" / "train.bin").read_bytes()


@pytest.fixture
def prepared(corpus, tok, tmp_path):
    root, _ = corpus
    data.prepare(root, tok, tmp_path / "prep", val_fraction=0.1, progress=False)
    return token_files.open_split(tmp_path / "prep", "train", tok)


def test_one_epoch_covers_windows_without_overlap(prepared):
    seq, bs = 16, 3
    loader = Loader(prepared, seq, bs, LoaderState(seed=3), prefetch=0)
    seen = []
    state = None
    for _, (batch, state) in zip(range(loader.batches_per_epoch), loader):  # noqa: B007 (state read after)
        seen += [tuple(row) for row in batch["tokens"]]
    assert state == LoaderState(3, 1, 0)
    n = loader.batches_per_epoch * bs
    windows = [tuple(prepared.tokens[i * seq:(i + 1) * seq]) for i in range(loader.n_windows)]
    ids = [windows.index(w) for w in seen]  # each batch row is one of the epoch's windows...
    assert len(set(ids)) == n  # ...and none repeats
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["tokens"][:, 1:])


def test_resume_mid_epoch_gives_the_same_batches(prepared):
    make = lambda state: iter(Loader(prepared, 16, 2, state, prefetch=2))
    it = make(LoaderState(seed=5))
    first = [next(it) for _ in range(7)]
    rest = [next(it)[0] for _ in range(10)]
    resumed = make(first[-1][1])
    for expected in rest:
        got, _ = next(resumed)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])


def test_segment_ids_positions_and_loss_mask_at_boundaries(prepared):
    tf = prepared
    boundary = int(tf.doc_starts[3])
    seq = 16
    w = boundary // seq  # the window containing the start of document 3
    b = data.window_batch(tf, np.array([w]), seq)
    j = boundary - w * seq
    toks, seg, pos, mask = b["tokens"][0], b["segment_ids"][0], b["positions"][0], b["loss_mask"][0]
    assert toks[j] == 1 and pos[j] == 0  # BOS of the new document restarts positions
    if j > 0:
        assert seg[j] == seg[j - 1] + 1 and toks[j - 1] == 2 and mask[j - 1] == 0  # EOS does not predict BOS
        assert pos[j - 1] == j - 1 - max(0, int(tf.doc_starts[2]) - w * seq)
    assert np.all(np.diff(seg) >= 0) and seg[0] == 1
    plain = data.window_batch(tf, np.array([w]), seq, document_masking=False)
    assert np.all(plain["segment_ids"] == 1) and np.all(plain["loss_mask"] == 1)
    np.testing.assert_array_equal(plain["positions"][0], np.arange(seq))


def test_two_processes_get_disjoint_batches(prepared):
    loaders = [Loader(prepared, 16, 2, LoaderState(seed=1), process_index=p, process_count=2, prefetch=0)
               for p in range(2)]
    ids = [np.concatenate([l.window_ids(0, k) for k in range(l.batches_per_epoch)]) for l in loaders]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) == len(ids[1]) > 0


def test_bad_inputs_get_one_line_messages(tmp_path, tok):
    with pytest.raises(DataError, match="missing: no such file or directory"):
        list(data.iter_documents(tmp_path / "missing"))
    (tmp_path / "bin.txt").write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(DataError, match="bin.txt: looks like a binary file"):
        list(data.iter_documents(tmp_path / "bin.txt"))
    (tmp_path / "bad.txt").write_bytes(b"hello \xff\xfe world")
    with pytest.raises(DataError, match=r"bad.txt: invalid UTF-8 at byte offset 6 \(set data.utf8_errors=replace"):
        list(data.iter_documents(tmp_path / "bad.txt"))
    stats = data.SourceStats()
    assert [t for _, t in data.iter_documents(tmp_path / "bad.txt", utf8_errors="replace", stats=stats)] == [
        "hello \ufffd\ufffd world"] and stats.replaced_bytes == 2
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: no string field 'text'"):
        list(data.iter_documents(tmp_path / "x.jsonl"))
    (tmp_path / "y.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"y.jsonl:2: not valid JSON"):
        list(data.iter_documents(tmp_path / "y.jsonl"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.txt").write_text("")
    with pytest.raises(DataError, match="the corpus is empty"):
        data.prepare(empty, tok, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "meta.json").exists() and not list((tmp_path / "out").glob("*.bin"))
    with pytest.raises(DataError, match="no .txt, .md or .jsonl files found"):
        data.expand_paths(tmp_path / "out")


def test_token_file_from_another_tokenizer_is_refused(corpus, tok, tmp_path):
    root, _ = corpus
    data.prepare(root, tok, tmp_path / "prep", progress=False)
    other = train_tokenizer(make_docs(100, 9), 300, tmp_path / "other.model")
    with pytest.raises(DataError, match="prepared with a different tokenizer"):
        token_files.open_split(tmp_path / "prep", "train", other)
    with pytest.raises(DataError, match="holds tokens from a different tokenizer"):
        data.prepare(root, other, tmp_path / "prep", progress=False)


def test_too_small_corpus_for_a_batch(prepared):
    with pytest.raises(DataError, match="too few for one batch"):
        Loader(prepared, 4096, 64, LoaderState(0))


def test_the_tokenizing_bar_ends_at_100_percent(corpus, tok, tmp_path, capsys):
    root, _ = corpus
    data.prepare(root, tok, tmp_path / "prep", progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "tokenizing: 100%" in bar, bar
