"""Faults and unlucky runs: damaged checkpoints, kills and double signals, a failing save, divergence, several
processes, and corpora a first test would not try. Each ends with what a user does next (resume, sample) working."""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from llama_jax.checkpoints import hf
from llama_jax.checkpoints import run_dir as checkpoint
from llama_jax.cli import generate as generate_cli
from llama_jax.cli import hf as hf_cli
from llama_jax.cli import train as train_cli
from llama_jax.train.metrics import read_metrics
from tests.test_bad_inputs import TINY, assert_one_error_line, generate_cli_text, write_corpus

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), n=20)


@pytest.fixture(scope="module")
def good(tmp_path_factory, corpus):
    run = tmp_path_factory.mktemp("good") / "run"
    assert train_cli.main(TINY + [f"--data.path={corpus}", "--run-dir", str(run), "--train.steps=6",
                                  "--train.save_every=2"]) == 0
    return run


def greedy(run, *extra) -> str:
    return generate_cli_text(["--checkpoint", str(run), "--prompt", "the king", "--temperature", "0",
                              "--max-new-tokens", "12", *extra])


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(Path(run) / "metrics.jsonl") if "loss" in r}


# --- damaged checkpoints ---------------------------------------------------------------------------------------


def _files(step_dir: Path, part: str):
    return sorted(f for f in (step_dir / part).rglob("*") if f.is_file() and f.stat().st_size > 0)


def _truncate_arrays(d):
    for f in _files(d, "state"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def _garble_arrays(d):
    for f in _files(d, "state"):
        if "/d/" in str(f):  # the OCDBT data files holding the arrays' bytes
            raw = bytearray(f.read_bytes())
            raw[len(raw) // 2:] = bytes(len(raw) - len(raw) // 2)
            f.write_bytes(bytes(raw))


def _truncate_meta(d):
    for f in _files(d, "meta"):
        f.write_bytes(f.read_bytes()[:10])


def _half_deleted(d):  # a kill while Orbax was removing the folder
    for f in _files(d, "state")[::2] + _files(d, "meta"):
        f.unlink()


DAMAGE = {
    "truncated arrays": _truncate_arrays,
    "garbled arrays": _garble_arrays,
    "truncated meta": _truncate_meta,
    "deleted state": lambda d: shutil.rmtree(d / "state"),
    "empty step folder": lambda d: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in list(d.iterdir())],
    "half-deleted folder": _half_deleted,
}
# Every kind of damage is tried with generate.py; each also with one of the other readers of a run directory.
READERS = ["resume", "init-from", "export", "resume", "init-from", "export"]


@pytest.mark.parametrize("damage, reader", list(zip(DAMAGE, READERS)))
def test_a_damaged_newest_step_is_moved_aside_and_the_previous_one_used(good, corpus, tmp_path, capsys, damage,
                                                                        reader):
    run = tmp_path / "run"
    shutil.copytree(good, run)
    expected_text = greedy(good, "--step", "4")
    DAMAGE[damage](run / "checkpoints" / "6")
    capsys.readouterr()
    assert greedy(run) == expected_text
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoints/6 is" in warnings[0] and "6.bad" in warnings[0], err
    assert (run / "checkpoints" / "6.bad").is_dir() and not (run / "checkpoints" / "6").exists()
    # --step names the damaged step in one line once it is set aside, and lists the steps there are.
    assert generate_cli.main(["--checkpoint", str(run), "--step", "6"]) == 2
    assert_one_error_line(capsys.readouterr().err, "no checkpoint for step 6 (steps: 2, 4)")

    DAMAGE[damage](shutil.copytree(good / "checkpoints" / "6", run / "checkpoints" / "6"))  # damaged again
    common = TINY + [f"--data.path={corpus}", "--train.save_every=2"]
    if reader == "resume":
        assert train_cli.main(common + ["--run-dir", str(run), "--resume", "--train.steps=8"]) == 0
        # The step that was set aside is saved again (no "step already exists").
        assert sorted(checkpoint.step_dirs(run / "checkpoints")) == [4, 6, 8]
        assert (run / "checkpoints" / "6.bad.1").is_dir()
    elif reader == "init-from":
        assert train_cli.main(common + ["--run-dir", str(tmp_path / "ft"), "--init-from", str(run),
                                        "--train.steps=2"]) == 0
    else:
        assert hf_cli.main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
        config, params = hf.load_hf_checkpoint(tmp_path / "hf")
        _, ref, _ = checkpoint.load_run_params(good, 4)
        np.testing.assert_array_equal(params["embed"], ref["embed"])
    assert "warning: checkpoint" in capsys.readouterr().err


# --- kills and signals -----------------------------------------------------------------------------------------


def _train_proc(corpus, run, *extra, **kwargs):
    args = [sys.executable, str(ROOT / "train.py"), *TINY, f"--data.path={corpus}", "--run-dir", str(run), *extra]
    return subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for_rows(run, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and len(losses(run)) < n and proc.poll() is None:
        time.sleep(0.02)


def test_sigkill_during_frequent_saves_then_resume_reproduces_the_uninterrupted_run(corpus, tmp_path):
    args = ["--train.steps=30", "--train.save_every=1", "--train.keep_checkpoints=2"]
    ref = tmp_path / "ref"
    assert train_cli.main(TINY + [f"--data.path={corpus}", "--run-dir", str(ref), *args]) == 0
    rng = np.random.default_rng(1234)
    run = tmp_path / "run"
    for attempt, delay in enumerate(rng.uniform(0.0, 0.3, size=3)):
        proc = _train_proc(corpus, run, *args, *(["--resume"] if attempt else []))
        _wait_for_rows(run, 3 + 8 * attempt, proc)
        time.sleep(delay)
        proc.kill()  # SIGKILL: no handler runs, a save may be half written
        proc.communicate()
        if attempt == 0:
            assert checkpoint.step_dirs(run / "checkpoints"), "killed before the first checkpoint"
    assert train_cli.main(TINY + [f"--data.path={corpus}", "--run-dir", str(run), *args, "--resume"]) == 0
    a, b = losses(ref), losses(run)
    assert sorted(b) == list(range(1, 31))
    assert [a[s] for s in range(1, 31)] == [b[s] for s in range(1, 31)]


def test_a_second_sigterm_while_saving_still_completes_the_stop_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    proc = _train_proc(corpus, run, "--train.steps=400", "--train.save_every=1000")
    _wait_for_rows(run, 4, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "again: still stopping" in err and "stopped by SIGTERM" in err
    saved = checkpoint.step_dirs(run / "checkpoints")
    assert saved and max(losses(run)) == saved[-1]
    _, _, meta = checkpoint.load_run_params(run)
    assert meta["step"] == saved[-1]


def test_a_signal_during_start_up_exits_at_once_with_one_line(corpus, tmp_path):
    run = tmp_path / "run"
    proc = _train_proc(corpus, run, "--train.steps=5")
    deadline = time.time() + 60
    while time.time() < deadline and not (run / "train.lock").exists():  # start-up has reached the run directory
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("stopped by SIGINT during start-up")
    assert not list(run.rglob("*.tmp")) and not (run / "config.yaml").exists()


def test_a_failed_asynchronous_save_stops_the_run_and_keeps_the_previous_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    proc = _train_proc(corpus, run, "--train.steps=400", "--train.save_every=5")
    deadline = time.time() + 120
    while time.time() < deadline and 5 not in checkpoint.step_dirs(run / "checkpoints"):
        time.sleep(0.01)
    # From now on no file of the process may grow past 64 KiB, as on a full disk: the next save fails (its array
    # file is larger), while metrics.jsonl stays below that.
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert_one_error_line(err, f"saving a checkpoint in {run / 'checkpoints'} failed: File too large",
                          "the previous checkpoint is kept")
    _, params, meta = checkpoint.load_run_params(run)
    assert meta["step"] == 5 and max(losses(run)) < 20


# --- divergence --------------------------------------------------------------------------------------------------


def test_a_diverging_run_keeps_only_finite_checkpoints(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    args = TINY + [f"--data.path={corpus}", "--run-dir", str(run), "--train.save_every=1"]
    assert train_cli.main(args + ["--train.steps=2"]) == 0
    capsys.readouterr()
    # A learning rate this large makes the parameters (and then the gradient norm) overflow within a few steps.
    assert train_cli.main(args + ["--train.steps=40", "--train.lr=1e35", "--train.grad_clip=0",
                                       "--train.warmup_steps=0", "--resume"]) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err, "at step", "stopped without saving it")
    for step in checkpoint.step_dirs(run / "checkpoints"):
        _, params, _ = checkpoint.load_run_params(run, step)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    assert all(v is None or np.isfinite(v) for r in read_metrics(run / "metrics.jsonl") for v in r.values())
    assert greedy(run).startswith("the king")


# --- corpora, tokenizers, metrics --------------------------------------------------------------------------------


def test_the_tiny_vocabulary_trains_on_a_chinese_corpus(tmp_path, capsys):
    rng = np.random.default_rng(0)
    # A Zipf-distributed draw over 8,000 CJK ideographs: thousands of distinct characters, as in real Chinese text.
    chars = np.array([chr(0x4E00 + i) for i in range(8000)])
    weights = 1.0 / np.arange(1, 8001)
    text = "".join(rng.choice(chars, size=120_000, p=weights / weights.sum()))
    corpus = tmp_path / "zh"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text("世界上最高的山峰是哪座?" + text[i * 6000:(i + 1) * 6000] + "\n")
    distinct = len(set(text))
    assert distinct > 3000
    run = tmp_path / "run"
    assert train_cli.main(TINY[:1] + ["--model.vocab_size=2048"] + TINY[1:] + [f"--data.path={corpus}", "--run-dir",
                                                                               str(run), "--train.steps=2"]) == 0
    from llama_jax.text.tokenizer import Tokenizer

    tok = Tokenizer(run / "tokenizer.model")
    sample = (corpus / "3.txt").read_text()
    assert tok.vocab_size == 2048 and tok.decode(tok.encode(sample)) == sample


def test_a_tokenizer_left_by_an_earlier_attempt_is_not_reused_in_silence(corpus, tmp_path, capsys):
    other = write_corpus(tmp_path / "other", n=4, words=50)
    (other / "extra.txt").write_text("zebra yak xylophone " * 40)
    run = tmp_path / "run"
    # An attempt that trained a tokenizer on another corpus, then failed (a bad seq_len found later).
    assert train_cli.main(TINY + [f"--data.path={other}", "--run-dir", str(run), "--train.steps=1"]) == 0
    shutil.rmtree(run / "checkpoints")
    first = (run / "tokenizer.model").read_bytes()
    capsys.readouterr()
    assert train_cli.main(TINY + [f"--data.path={corpus}", "--run-dir", str(run), "--train.steps=1"]) == 0
    assert "left by an earlier attempt" in capsys.readouterr().err
    assert (run / "tokenizer.model").read_bytes() != first
    # The same corpus and settings again: reused, said nothing.
    shutil.rmtree(run / "checkpoints")
    second = (run / "tokenizer.model").read_bytes()
    assert train_cli.main(TINY + [f"--data.path={corpus}", "--run-dir", str(run), "--train.steps=1"]) == 0
    assert "earlier attempt" not in capsys.readouterr().err and (run / "tokenizer.model").read_bytes() == second


def test_a_corpus_too_small_for_a_validation_split_still_validates(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c", n=3, words=200)
    run = tmp_path / "run"
    assert train_cli.main(TINY + [f"--data.path={corpus}", "--run-dir", str(run), "--train.steps=2",
                                  "--train.eval_every=2", "--train.batch_size=2", "--data.val_fraction=0.001"]) == 0
    captured = capsys.readouterr()
    assert "holding out the last one" in captured.err
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert rows and np.isfinite(rows[-1]["val_loss"])
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))


def test_resume_survives_a_metrics_line_cut_off_by_a_kill(good, corpus, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.2')
    assert train_cli.main(TINY + [f"--data.path={corpus}", "--run-dir", str(run), "--resume", "--train.steps=8"]) == 0
    assert sorted(losses(run)) == list(range(1, 9))


def test_files_are_written_with_the_users_umask(good, tmp_path):
    old = os.umask(0o022)
    try:
        from llama_jax.text.tokenizer import train_tokenizer

        tok = train_tokenizer(["the king and the queen"] * 50, 300, tmp_path / "t" / "tokenizer.model")
        assert (tok.model_file.stat().st_mode & 0o777) == 0o644
        assert hf_cli.main(["export", "--checkpoint", str(good), "--out", str(tmp_path / "hf")]) == 0
        assert ((tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(old)


def test_export_overwrite_removes_stale_shards(good, tmp_path):
    out = tmp_path / "hf"
    assert hf_cli.main(["export", "--checkpoint", str(good), "--out", str(out), "--max-shard-gb", "0.00005"]) == 0
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert hf_cli.main(["export", "--checkpoint", str(good), "--out", str(out), "--overwrite"]) == 0
    assert not list(out.glob("model-*")) and not (out / "model.safetensors.index.json").exists()
    assert (out / "model.safetensors").is_file()
    tok = checkpoint.tokenizer_of(checkpoint.load_run_params(good)[2], good)
    assert (out / "tokenizer.model").read_bytes() == tok.model_bytes == (good / "tokenizer.model").read_bytes()


def test_retention_moves_a_step_aside_before_deleting_it(corpus, tmp_path, monkeypatch, capsys):
    """A kill in the middle of deleting an old step (keep_checkpoints) must not leave it half-deleted among the
    steps: Orbax renames it into checkpoints/deleting/ first, and the next start clears what is left there."""
    run = tmp_path / "run"
    args = TINY + [f"--data.path={corpus}", "--run-dir", str(run), "--train.save_every=1",
                   "--train.keep_checkpoints=2"]
    monkeypatch.setattr(checkpoint, "empty_trash", lambda d: None)  # as if killed before each delete finished
    assert train_cli.main(args + ["--train.steps=4"]) == 0
    trash = run / "checkpoints" / checkpoint.TRASH
    assert sorted(int(p.name) for p in trash.iterdir()) == [1, 2]
    assert checkpoint.step_dirs(run / "checkpoints") == [3, 4]
    _half_deleted(trash / "2")  # what a kill in the middle of removing it leaves
    monkeypatch.undo()
    assert generate_cli.main(["--checkpoint", str(run), "--step", "2"]) == 2
    assert_one_error_line(capsys.readouterr().err, "no checkpoint for step 2 (steps: 3, 4)")
    assert train_cli.main(args + ["--train.steps=6", "--resume"]) == 0
    assert checkpoint.step_dirs(run / "checkpoints") == [5, 6] and not list(trash.iterdir())


# --- several processes -------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_from_a_fresh_run_directory_match_one_process(corpus, tmp_path):
    args = ["--train.steps=6", "--train.save_every=3"]
    env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    one = tmp_path / "one"
    ref = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, f"--data.path={corpus}", "--run-dir",
                          str(one), *args, "--mesh", "data=1"], env=env, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    two = tmp_path / "two"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, f"--data.path={corpus}", "--run-dir",
                               str(two), *args, "--mesh", "data=2", "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i), "--distributed-timeout", "60"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err
    a, b = losses(one), losses(two)
    assert sorted(b) == list(range(1, 7))
    diff = max(abs(a[s] - b[s]) for s in range(1, 7))
    print(f"two processes vs one: max |loss difference| over 6 steps = {diff:.2e}")
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=2e-5)
    assert checkpoint.step_dirs(two / "checkpoints") == [3, 6]


@pytest.mark.parametrize("moment", ["loading", "tokenizer", "first step"])
def test_ctrl_c_at_any_moment_of_start_up_ends_with_one_line(corpus, tmp_path, moment):
    """SIGINT while Python and JAX load, while the tokenizer trains, and while the first step compiles: exit 130
    and one line (or, once training has begun, the stop checkpoint and 0); never a traceback or an abort from
    inside XLA (an exception raised by the handler while C++ was on the stack aborted the process)."""
    import selectors

    proc = _train_proc(corpus, tmp_path / "run", "--train.steps=400")
    marker = {"loading": None, "tokenizer": "training a bpe tokenizer", "first step": "0/400"}[moment]
    seen, sel = "", selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + 120
    if marker is None:  # the command's own handlers are in (it catches SIGTERM from then on) while JAX loads
        caught = lambda: int(next(line for line in open(f"/proc/{proc.pid}/status")
                                  if line.startswith("SigCgt")).split()[1], 16)
        while not caught() >> (signal.SIGTERM - 1) & 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "jax" not in _modules_loaded(proc.pid), "JAX was loaded before the command took its signals"
    while marker is not None and marker not in seen and time.monotonic() < deadline:
        if sel.select(timeout=1):
            seen += os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    err = seen + err
    assert "Traceback" not in err and "terminate called" not in err, err[-2000:]
    stops = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("stopped by SIGINT")]
    assert len(stops) == 1, err[-2000:]
    if proc.returncode == 0:  # the signal came once the first step was under way: it was saved
        assert "after step 1" in stops[0] and (tmp_path / "run" / "checkpoints" / "1").is_dir()
    else:
        assert proc.returncode == 130 and "nothing was" in stops[0], (proc.returncode, err[-2000:])


def _modules_loaded(pid: int) -> str:
    """The shared libraries mapped into a process (JAX's XLA extension appears once `import jax` has begun)."""
    return "jax" if "xla_extension" in open(f"/proc/{pid}/maps").read() or "jaxlib" in open(
        f"/proc/{pid}/maps").read() else ""


def _two_processes(corpus, run, *args, env=None):
    port = _free_port()
    env = env or {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, f"--data.path={corpus}", "--run-dir",
                              str(run), *args, "--mesh", "data=2", "--coordinator", f"127.0.0.1:{port}",
                              "--num-processes", "2", "--process-id", str(i), "--distributed-timeout", "60"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGTERM)])
def test_two_processes_signalled_apart_save_the_same_step_and_exit_0(corpus, tmp_path, first, second):
    """What a cluster does on preemption: a signal to one process, then 1.5 s later to the other. Both save one
    stop checkpoint at the same step and exit 0 (jax.distributed.initialize takes SIGTERM for JAX's preemption
    notifier, so SIGTERM goes through JAX's preemption sync point; SIGINT through our own agreement)."""
    run = tmp_path / "run"
    procs = _two_processes(corpus, run, "--train.steps=100000", "--train.save_every=100000")
    _wait_for_rows(run, 3, procs[0])
    procs[0].send_signal(first)
    time.sleep(1.5)
    procs[1].send_signal(second)
    results = []
    for p in procs:
        try:
            results.append(p.communicate(timeout=120))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a process was still running 120 s after the signals")
    stops = []
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        stops += [line for line in err.replace("\r", "\n").splitlines() if line.startswith("stopped by")]
    assert len(stops) == 2, stops
    steps = {int(s.split("after step ")[1].split(";")[0]) for s in stops}
    assert len(steps) == 1, stops
    assert checkpoint.step_dirs(run / "checkpoints") == [steps.pop()]


def _tool_proc(*args):
    return subprocess.Popen([sys.executable, *args], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _read_until(proc, stream, marker: str, timeout: float = 120) -> str:
    import selectors

    seen, sel, deadline = "", selectors.DefaultSelector(), time.monotonic() + timeout
    sel.register(stream, selectors.EVENT_READ)
    while marker not in seen and time.monotonic() < deadline and proc.poll() is None:
        if sel.select(timeout=0.5):
            seen += os.read(stream.fileno(), 4096).decode(errors="replace")
    return seen


@pytest.mark.parametrize("tool, signum", [("generate", signal.SIGTERM), ("chat", signal.SIGTERM),
                                          ("eval", signal.SIGINT), ("eval", signal.SIGTERM)])
def test_a_stop_signal_ends_the_other_tools_with_one_line_and_128_plus_n(good, corpus, tmp_path, tool, signum):
    """generate.py, its chat and the evaluator have nothing to save: SIGINT or SIGTERM at any moment after JAX has
    loaded ends them at once with "stopped by SIGNAL" and 128 + N (SIGTERM used to kill them without a word)."""
    name = signal.Signals(signum).name
    if tool == "eval":  # a long scoring loop
        big = tmp_path / "big.txt"
        big.write_text((Path(corpus) / "doc0.txt").read_text() * 4000)
        proc = _tool_proc("-m", "llama_jax.eval", "perplexity", "--checkpoint", str(good), "--data", str(big),
                          "--window", "16", "--stride", "1", "--batch-tokens", "64")
        marker = None
    else:
        extra = ["--chat"] if tool == "chat" else ["--prompt", "the king", "--seed", "1"]
        proc = _tool_proc("generate.py", "--checkpoint", str(good), "--max-new-tokens", "30", *extra)
        marker = "chat: type a message" if tool == "chat" else None
    if marker is None:  # once JAX is loaded, while the checkpoint loads and the program compiles
        deadline = time.monotonic() + 60
        while not _modules_loaded(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        # generate: JAX still loading, or the checkpoint (the run is over in 4 s on an idle machine); eval: scoring
        time.sleep(0.5 if tool == "generate" else 5.0)
        seen = ""
    else:
        seen = _read_until(proc, proc.stderr, marker)
        assert marker in seen, (seen[-2000:], proc.communicate())
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    err = seen + err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert proc.returncode == 128 + signum, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and lines[-1] in (f"stopped by {name}", f"stopped by {name} while starting; "
                                                    "nothing was done"), err[-2000:]
