"""Bad input, as a new user gives it, through the real entry points (their main(), in-process for speed): each case
asserts the exit code, one `error:` line naming the file, key or flag, no traceback, and that what was there before
is intact (same files, same bytes, and the good run still generates the same greedy text)."""

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from llama_jax.checkpoints import hf
from llama_jax.cli import generate as generate_cli
from llama_jax.cli import hf as hf_cli
from llama_jax.cli import tokenizer as tokenizer_cli
from llama_jax.cli import train as train_cli
from llama_jax.train.runtime import RunLock

WORDS = "the king queen castle sword crown night day love war peace river stone fire".split()
TINY = ["--model.vocab_size=320", "--model.dim=32", "--model.n_layers=2", "--model.n_heads=4",
        "--model.n_kv_heads=2", "--model.ffn_dim=64", "--model.max_seq_len=64", "--train.seq_len=32",
        "--train.batch_size=8", "--train.warmup_steps=2", "--train.lr=3e-3", "--train.eval_batches=2",
        "--train.log_every=1", "--train.peak_flops=1e12", "--train.eval_every=100"]


def write_corpus(root: Path, n: int = 12, words: int = 300) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        start = rng.integers(len(WORDS))
        (root / f"doc{i}.txt").write_text(" ".join(WORDS[(start + j) % len(WORDS)] for j in range(words)) + "\n")
    return root


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A trained run directory (checkpoints 2, 4, 6) shared by every case; cases that damage it use a copy."""
    root = tmp_path_factory.mktemp("good")
    corpus = write_corpus(root / "corpus")
    run = root / "run"
    assert train_cli.main(TINY + [f"--data.path={corpus}", "--run-dir", str(run), "--train.steps=6",
                                  "--train.save_every=2"]) == 0
    return {"root": root, "corpus": corpus, "run": run}


def greedy(run, *extra) -> str:
    return generate_cli_text(["--checkpoint", str(run), "--prompt", "the king", "--temperature", "0",
                              "--max-new-tokens", "12", *extra])


def generate_cli_text(argv) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert generate_cli.main(argv) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def good_text(good):
    return {step: greedy(good["run"], "--step", str(step)) for step in (4, 6)}


def snapshot(path: Path) -> dict:
    """Every file under `path` with its content hash (and the directory's own existence)."""
    if not path.exists():
        return {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def assert_one_error_line(err: str, *needles: str):
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


TOOLS = {"train": train_cli.main, "generate": generate_cli.main, "hf": hf_cli.main, "tokenizer": tokenizer_cli.main}


def _case(tool, argv, needles, setup=None, watch="run", code=2):
    return pytest.param(tool, argv, needles, setup, watch, code, id=f"{tool}:{needles[0]}"[:80])


def _jsonl_bad_second_file(d):
    (d / "c").mkdir()
    (d / "c" / "a.jsonl").write_text('{"text": "the king"}\n' * 5)
    (d / "c" / "b.jsonl").write_text('{"text": "ok"}\n{"text": "ok"\n')


def _utf8_bad_second_file(d):
    write_corpus(d / "c", n=2)
    (d / "c" / "z.txt").write_bytes(b"the king \xff\xfe queen")


def _chat_bad_role(d):
    (d / "c").mkdir()
    good_line = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    (d / "c" / "a.jsonl").write_text(good_line + "\n")
    with gzip.open(d / "c" / "b.jsonl.gz", "wt") as f:
        f.write(good_line + "\n" + good_line.replace('"user"', '"robot"') + "\n")


def _not_spm(d):
    (d / "tok.model").write_text("not a model")


def _yaml(text):
    def setup(d):
        (d / "c.yaml").write_text(text)
    return setup


def _hf_dir(kind):
    def setup(d):
        h = d / "hf"
        h.mkdir()
        if kind == "bad-json":
            (h / "config.json").write_text("{not json")
            (h / "model.safetensors").write_bytes(b"\0" * 16)
            shutil.copy(d / "run" / "tokenizer.model", h / "tokenizer.model")
        elif kind == "truncated":
            from llama_jax.checkpoints import run_dir as checkpoint

            config, params, _ = checkpoint.load_run_params(d / "run")
            hf.save_hf_checkpoint(h, config, params)
            w = h / "model.safetensors"
            w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
            shutil.copy(d / "run" / "tokenizer.model", h / "tokenizer.model")
    return setup


def _run_and_hf_in_one(d):
    """An export written into a copy of a run directory: both kinds of checkpoint in one place."""
    shutil.copytree(d / "run", d / "both")
    _hf_dir("truncated")(d)
    for f in (d / "hf").iterdir():
        shutil.copy(f, d / "both" / f.name)


def _hf_with_checkpoints_folder(d):
    _hf_dir("bad-json")(d)
    (d / "hf" / "checkpoints").mkdir()  # e.g. a trainer's own folder: still a Hugging Face directory


def _non_empty_out(d):
    (d / "out").mkdir()
    (d / "out" / "notes.txt").write_text("mine")


def _a_file(d):
    (d / "a_file").write_text("a file, where a directory would have to be\n")


def _neither(d):
    (d / "empty").mkdir()


C = "{corpus}"
R = "{run}"
D = "{dir}"
BAD_INPUTS = [
    # train.py: flags and config
    _case("train", ["--train.stepz", "3"], ["unknown key train.stepz"]),
    _case("train", ["--train.steps", "many"], ["train.steps='many': expected an integer"]),
    _case("train", ["--model.n_heads=3"], ["n_heads=3 does not divide dim=32"]),
    _case("train", ["--train.seq_len", "128"], ["train.seq_len=128 exceeds model.max_seq_len=64"]),
    _case("train", ["--mesh", "data=16"], ["needs 16 devices"]),
    _case("train", ["--mesh", "pipeline=2"], ["expected comma-separated AXIS=N"]),
    _case("train", ["stray"], ["unrecognized argument 'stray'"]),
    _case("train", ["--coordinator", "127.0.0.1:1"], ["--coordinator, --num-processes and --process-id go together"]),
    _case("train", ["--config", f"{D}/nope.yaml"], ["nope.yaml: config file not found"]),
    _case("train", ["--config", f"{D}/c.yaml"], ["c.yaml: invalid YAML at line"], _yaml("model:\n  dim: [\n")),
    _case("train", ["--config", f"{D}/c.yaml"], ["unknown section 'modle'"], _yaml("modle:\n  dim: 3\n")),
    _case("train", ["--config", f"{D}/c.yaml"], ["unknown key model.dimm"], _yaml("model:\n  dimm: 3\n")),
    # train.py: the run directory
    _case("train", ["--run-dir", R], ["already has checkpoints; pass --resume"]),
    _case("train", ["--run-dir", R, "--resume", "--model.dim", "64"], ["the model config differs: dim (saved 32"]),
    _case("train", ["--run-dir", f"{D}/fresh", "--resume"], ["has no checkpoint to resume from"], watch="fresh"),
    _case("train", ["--run-dir", f"{D}/afile"], ["exists and is not a directory"],
          lambda d: (d / "afile").write_text("x"), watch="afile"),
    # train.py: the corpus and the tokenizer
    _case("train", ["--data.path", f"{D}/missing"], ["missing: no such file or directory"]),
    _case("train", ["--data.path", f"{D}/c/*.txt"], ["c/*.txt: no files match this pattern"]),
    _case("train", ["--data.path", f"{D}/c"], ["c/b.jsonl:2: not valid JSON"], _jsonl_bad_second_file),
    _case("train", ["--data.path", f"{D}/c"], ["c/z.txt: invalid UTF-8 at byte offset 9"], _utf8_bad_second_file),
    _case("train", ["--data.path", f"{D}/c", "--data.format=chat"],
          ["b.jsonl.gz:2: message 0 has unknown role 'robot'"], _chat_bad_role),
    _case("train", ["--data.tokenizer", f"{D}/none.model"], ["data.tokenizer=", "none.model: no such file"]),
    _case("train", ["--data.tokenizer", f"{D}/tok.model"], ["tok.model: not a SentencePiece model"], _not_spm),
    _case("train", ["--model.vocab_size", "60000"], ["vocab size 60000 is too large for this corpus"]),
    _case("train", ["--model.vocab_size", "40"], ["vocab size 40 is too small", "(at least 265)"]),
    _case("train", ["--model.vocab_size", "266"], ["vocab size 266 is too small for this corpus"]),
    # a place that cannot be written (as root, only a path under a file is unwritable)
    _case("train", ["--run-dir", f"{D}/a_file/run"], ["--run-dir", "a_file/run: cannot write there"], _a_file,
          watch="a_file"),
    _case("train", ["--run-dir", f"{D}/fresh", "--data.cache_dir", f"{D}/a_file/tokens"],
          ["data.cache_dir", "a_file/tokens: cannot write there"], _a_file, watch="a_file"),
    # generate.py
    _case("generate", ["--checkpoint", f"{D}/nowhere"], ["--checkpoint", "nowhere: no such file or directory"]),
    _case("generate", ["--checkpoint", f"{D}/empty"], ["neither a training run directory"], _neither),
    _case("generate", ["--checkpoint", R, "--step", "99"], ["no checkpoint for step 99 (steps: 2, 4, 6)"]),
    _case("generate", ["--checkpoint", R, "--prompt-file", f"{D}/p.txt"], ["--prompt-file", "p.txt: no such file"]),
    _case("generate", ["--checkpoint", R, "--prompt-file", f"{D}/p.txt"], ["p.txt: invalid UTF-8 at byte offset 1"],
          lambda d: (d / "p.txt").write_bytes(b"a\xff")),
    _case("generate", ["--checkpoint", R, "--top-p", "2"], ["--top-p=2.0 must be in (0, 1]"]),
    _case("generate", ["--checkpoint", R, "--top-k", "0"], ["--top-k=0 must be a positive integer"]),
    _case("generate", ["--checkpoint", R, "--temperature", "-1"], ["--temperature=-1.0 must be >= 0"]),
    _case("generate", ["--checkpoint", R, "--num-samples", "0"], ["--num-samples=0 must be >= 1"]),
    _case("generate", ["--checkpoint", R, "--max-new-tokens", "0"], ["--max-new-tokens=0 must be >= 1"]),
    _case("generate", ["--checkpoint", R, "--max-new-tokens", "500"], ["exceeds the model's context of 64 tokens"]),
    _case("generate", ["--checkpoint", R, "--chat", "--prompt", "hi"], ["--chat reads its prompts interactively"]),
    _case("generate", ["--checkpoint", R, "--top-q", "1"], ["unrecognized arguments: --top-q"]),
    _case("generate", ["--checkpoint", f"{D}/hf"], ["config.json: not valid JSON"], _hf_dir("bad-json")),
    _case("generate", ["--checkpoint", f"{D}/hf"], ["model.safetensors: unreadable safetensors file"],
          _hf_dir("truncated")),
    _case("generate", ["--checkpoint", f"{D}/hf", "--step", "2"],
          ["--step 2", "is not a training run directory, so it has no steps"], _hf_dir("truncated")),
    _case("generate", ["--checkpoint", f"{D}/both"], ["holds both a training run", "and a Hugging Face checkpoint"],
          _run_and_hf_in_one, watch="both"),
    _case("generate", ["--checkpoint", f"{D}/hf"], ["config.json: not valid JSON"], _hf_with_checkpoints_folder),
    # python -m llama_jax.hf
    _case("hf", ["export", "--checkpoint", R, "--out", f"{D}/out"], ["--out", "not empty; pass --overwrite"],
          _non_empty_out, watch="out"),
    _case("hf", ["export", "--checkpoint", R, "--out", f"{D}/out", "--overwrite"],
          ["holds files that are not part of an export (notes.txt)"], _non_empty_out, watch="out"),
    _case("hf", ["export", "--checkpoint", R, "--out", f"{R}/hf"], ["inside the --checkpoint directory"]),
    _case("hf", ["export", "--checkpoint", f"{D}/nowhere", "--out", f"{D}/o2"], ["nowhere: no such file"]),
    _case("hf", ["export", "--checkpoint", R, "--step", "5", "--out", f"{D}/o3"], ["no checkpoint for step 5"]),
    _case("hf", ["import", "--checkpoint", R, "--out", f"{D}/o4"], ["import reads a Hugging Face directory"]),
    _case("hf", ["convert"], ["invalid choice: 'convert'"]),
    _case("hf", ["export", "--checkpoint", R, "--out", f"{D}/a_file/hf"], ["--out", "a_file/hf: cannot write there"],
          _a_file, watch="a_file"),
    # python -m llama_jax.tokenizer
    _case("tokenizer", ["train", "--input", f"{D}/missing.txt", "--vocab-size", "300", "--out", f"{D}/t.model"],
          ["missing.txt: no such file or directory"]),
    _case("tokenizer", ["train", "--input", f"{D}/c", "--vocab-size", "300", "--out", f"{D}/t.model"],
          ["c/z.txt: invalid UTF-8 at byte offset 9"], _utf8_bad_second_file),
]


@pytest.mark.parametrize("tool, argv, needles, setup, watch, code", BAD_INPUTS)
def test_bad_input_gets_one_line_and_changes_nothing(good, good_text, tmp_path, capsys, tool, argv, needles, setup,
                                                     watch, code):
    shutil.copytree(good["run"], tmp_path / "run")
    if setup:
        setup(tmp_path)
    fill = lambda a: a.replace(D, str(tmp_path)).replace(R, str(tmp_path / "run")).replace(C, str(good["corpus"]))
    argv = [fill(a) for a in argv]
    if tool == "train":
        if "--run-dir" not in argv:
            argv += ["--run-dir", str(tmp_path / "new_run")]
        if "--data.path" not in argv:
            argv += [f"--data.path={good['corpus']}"]
        argv = TINY + argv
    watched = tmp_path / watch
    before, run_before = snapshot(watched), snapshot(tmp_path / "run")
    capsys.readouterr()
    assert TOOLS[tool](argv) == code
    assert_one_error_line(capsys.readouterr().err, *[fill(n) for n in needles])
    assert snapshot(watched) == before
    assert snapshot(tmp_path / "run") == run_before
    assert not (tmp_path / "new_run" / "config.yaml").exists()  # written only after every check passed
    assert not list(tmp_path.rglob("*.tmp"))


def test_the_good_run_still_generates_the_same_text_after_every_case(good, good_text):
    assert greedy(good["run"]) == good_text[6]


def test_a_second_writer_is_refused_while_the_run_directory_is_in_use(good, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(good["run"], run)
    lock = RunLock(run)  # what a running train.py holds
    try:
        before = snapshot(run)
        assert train_cli.main(TINY + ["--run-dir", str(run), "--resume", f"--data.path={good['corpus']}",
                                      "--train.steps=8"]) == 2
        assert_one_error_line(capsys.readouterr().err, f"{run} is in use by another train.py (pid {os.getpid()})")
        assert snapshot(run) == before
    finally:
        lock.release()
    # Released (as on any exit of the holder): the same command now runs.
    assert train_cli.main(TINY + ["--run-dir", str(run), "--resume", f"--data.path={good['corpus']}",
                                  "--train.steps=8"]) == 0


def test_help_lists_every_config_key_with_type_and_default(capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.parse_args(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    import dataclasses

    from llama_jax.config import SECTIONS

    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"--{section}.{f.name}" in text, f.name
    assert "(default: 0.05)" in text and "share of documents held out for validation" in text
    assert train_cli.main(["--help"]) == 0
    capsys.readouterr()
    assert generate_cli.main(["--help"]) == 0
    assert "(default: 0.8)" in " ".join(capsys.readouterr().out.split())


def test_flags_take_a_value_after_a_space_or_an_equals_sign_as_yaml_scalars():
    _, a = train_cli.parse_args(["--data.path", "my_corpus/**/*.txt", "--train.steps", "5", "--data.separator=\\n\\n"])
    _, b = train_cli.parse_args(["--data.path=my_corpus/**/*.txt", "--train.steps=5", "--data.separator", "\\n\\n"])
    from llama_jax.config import load_run_config

    for overrides in (a, b):
        config = load_run_config(None, overrides)
        assert config.data.path == "my_corpus/**/*.txt" and config.train.steps == 5
        assert config.data.separator == "\n\n"
