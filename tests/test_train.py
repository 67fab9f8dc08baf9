import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llama_jax as lj
from llama_jax import optim, sharding
from llama_jax.checkpoints import run_dir as checkpoint
from llama_jax.cli import train as train_cli
from llama_jax.config import TrainConfig
from llama_jax.train import step as T
from llama_jax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the king queen castle sword crown night day love war peace river stone fire".split()

# A model and corpus small enough that a step takes milliseconds.
TINY = ["--model.vocab_size=320", "--model.dim=32", "--model.n_layers=2", "--model.n_heads=4",
        "--model.n_kv_heads=2", "--model.ffn_dim=64", "--model.max_seq_len=64", "--train.seq_len=32",
        "--train.batch_size=8", "--train.warmup_steps=2", "--train.lr=3e-3", "--train.eval_batches=2",
        "--train.log_every=1", "--train.peak_flops=1e12"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(30):
        # A learnable pattern: words follow each other in a fixed cycle with occasional noise.
        start = rng.integers(len(WORDS))
        words = [WORDS[(start + j) % len(WORDS)] if rng.random() > 0.1 else rng.choice(WORDS) for j in range(300)]
        (root / f"doc{i}.txt").write_text(" ".join(words) + "\n")
    return root


def train_args(corpus, run_dir, *extra):
    return TINY + [f"--data.path={corpus}", "--run-dir", str(run_dir), *extra]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def test_loss_falls_and_run_dir_is_complete(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli.main(train_args(corpus, run, "--train.steps=40", "--train.eval_every=20",
                                     "--train.save_every=20")) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and f"checkpoint: {run / 'checkpoints' / '40'}" in out
    assert f"metrics: {run / 'metrics.jsonl'}, loss plot: {run / 'loss.png'}, TensorBoard: tensorboard --logdir" in out
    l = losses(run)
    assert np.mean([l[s] for s in range(36, 41)]) < np.mean([l[s] for s in range(1, 6)]) - 1.0
    rows = read_metrics(run / "metrics.jsonl")
    assert any("val_loss" in r for r in rows) and any("mfu" in r and "tok_per_s" in r for r in rows)
    for name in ("config.yaml", "tokenizer.model", "loss.png", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["20", "40"]
    config, params, meta = checkpoint.load_run_params(run)
    assert config.dim == 32 and meta["step"] == 40 and params["layers"]["wq"].shape == (2, 32, 32)


def test_sigterm_saves_and_resume_reproduces_losses_exactly(corpus, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    # 48 steps: here the signal lands 2-4 steps after the 5th is logged; a much faster machine still stops mid-run
    args = ["--train.steps=48", "--train.eval_every=100", "--train.save_every=100"]
    assert train_cli.main(train_args(corpus, full, *args)) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *train_args(corpus, part, *args)],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(losses(part)) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err
    saved = int(sorted((part / "checkpoints").iterdir(), key=lambda p: int(p.name))[-1].name)
    assert 5 <= saved < 48
    assert train_cli.main(train_args(corpus, part, *args, "--resume")) == 0
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, 49))
    assert [a[s] for s in range(1, 49)] == [b[s] for s in range(1, 49)]  # bit-identical float32 losses


def test_the_run_s_named_steps_called_one_by_one_equal_train_py(corpus, tmp_path, capsys):
    """A notebook can take the run apart: docs/train.md's snippet, which calls the steps of loop.run one by one,
    gives the same losses, weights and config.yaml as train.py."""
    import re

    extra = ["--train.steps=6", "--train.eval_every=3", "--train.save_every=3"]
    assert train_cli.main(train_args(corpus, tmp_path / "cli", *extra)) == 0
    _, overrides = train_cli.parse_args(train_args(corpus, tmp_path / "unused", *extra))
    page = (ROOT / "docs" / "train.md").read_text()
    code = re.search(r"```python\n(from pathlib import Path\nfrom llama_jax.train import loop\n.*?)```", page,
                     re.S).group(1)
    for old, new in [('"runs/notebook"', repr(str(tmp_path / "steps"))), ('["train.steps=20"]', repr(overrides)),
                     ('"configs/tiny.yaml"', "None")]:
        assert old in code, f"docs/train.md's snippet no longer has {old}"
        code = code.replace(old, new)
    scope = {}
    exec(compile(code, "docs/train.md", "exec"), scope)
    result, run_dir = scope["result"], tmp_path / "steps"
    assert result["step"] == 6 and result["stopped_by"] is None and result["val_loss"] is not None
    assert losses(run_dir) == losses(tmp_path / "cli")
    _, a, _ = checkpoint.load_run_params(tmp_path / "cli", 6)
    _, b, _ = checkpoint.load_run_params(run_dir, 6)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert (run_dir / "config.yaml").read_text() == (tmp_path / "cli" / "config.yaml").read_text()
    assert scope["lock"].file.closed  # released: another train.py may use the directory now


def test_half_written_checkpoint_is_ignored(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    base = train_args(corpus, run, "--train.eval_every=100", "--train.save_every=5")
    assert train_cli.main(base + ["--train.steps=10"]) == 0
    ckpts = run / "checkpoints"
    # What a kill mid-save leaves: Orbax's temporary directory (never renamed to "15")...
    shutil.copytree(ckpts / "10", ckpts / "15.orbax-checkpoint-tmp-1234567")
    # ...and, worse, a directory whose files were cut short.
    shutil.copytree(ckpts / "10", ckpts / "20")
    for f in (ckpts / "20" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
    assert train_cli.main(base + ["--train.steps=12", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "20 is unreadable" in err and f"resumed from {ckpts / '10'}" in err
    assert not list(ckpts.glob("*.orbax-checkpoint-tmp*"))  # the killed save's leftovers are cleared at the start


def test_incompatible_resume_and_bad_config_get_one_line_errors(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli.main(train_args(corpus, run, "--train.steps=2", "--train.eval_every=100")) == 0
    capsys.readouterr()
    cases = [
        (train_args(corpus, run, "--train.steps=4", "--model.dim=64", "--resume"),
         "cannot resume", "the model config differs: dim (saved 32, now 64)"),
        (train_args(corpus, run, "--train.steps=4"), "already has checkpoints; pass --resume", ""),
        (train_args(corpus, tmp_path / "b", "--train.stepz=3"), "unknown key train.stepz", ""),
        (train_args(corpus, tmp_path / "b", "--train.steps=many"), "train.steps='many': expected an integer", ""),
        (train_args(corpus, tmp_path / "b", "--model.n_heads=3"), "n_heads=3 does not divide dim=32", ""),
        (train_args(corpus, tmp_path / "b", "--train.mesh=data=3"), "needs 3 devices", ""),
        (train_args(tmp_path / "missing", tmp_path / "b"), "missing: no such file or directory", ""),
    ]
    for argv, *messages in cases:
        if "--train.mesh=data=3" in argv:
            argv = argv[:]  # 8 host devices exist; ask for more than that instead
            argv[argv.index("--train.mesh=data=3")] = "--train.mesh=data=16"
            messages = ["needs 16 devices"]
        assert train_cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and err.splitlines()[-1].startswith("error: "), err
        assert sum("error" in line for line in err.splitlines()) == 1, err
        err = err.splitlines()[-1]
        for m in messages:
            assert m in err, err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli.main(train_args(corpus, run, "--train.steps=3", "--train.eval_every=100")) == 0
    capsys.readouterr()
    code = train_cli.main(train_args(corpus, run, "--train.steps=8", "--train.eval_every=100", "--train.save_every=1",
                                     "--train.lr=1e30", "--train.grad_clip=0", "--train.warmup_steps=0", "--resume"))
    err = capsys.readouterr().err
    assert code == 2 and ("is nan" in err.lower() or "is inf" in err.lower()), err
    config, params, meta = checkpoint.load_run_params(run)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


# --- the optimizer and the step --------------------------------------------------------------------------------


def small_setup(**train_kwargs):
    config = lj.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)
    train = TrainConfig(steps=10, batch_size=8, seq_len=16, warmup_steps=0, **train_kwargs)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (8, 17)).astype(np.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
             "segment_ids": np.ones((8, 16), np.int32),
             "loss_mask": (rng.random((8, 16)) > 0.2).astype(np.float32)}
    return config, train, jax.tree.map(jnp.asarray, batch)


def test_weight_decay_mask_covers_exactly_the_matrices():
    config, _, _ = small_setup()
    params = lj.init_params(config, jax.random.key(0))
    mask = optim.decay_mask(params)
    assert mask["layers"] == {"attn_norm": False, "wq": True, "wk": True, "wv": True, "wo": True,
                              "ffn_norm": False, "w_gate": True, "w_up": True, "w_down": True}
    assert mask["embed"] is False and mask["final_norm"] is False and mask["lm_head"] is True
    assert optim.decay_mask(params, decay_embeddings=True)["embed"] is True
    # Behaviourally: with zero gradients only the decayed leaves move.
    train = TrainConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, grad_clip=0)
    opt = optim.make_optimizer(train)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert moved == mask


def test_gradient_accumulation_equals_one_big_batch():
    config, train, batch = small_setup()
    acc = TrainConfig(**{**train.__dict__, "grad_accum": 4})
    params = optim.init_state(config, train, jax.random.key(0)).params
    # What accumulation must make equal, tightly: the summed loss and gradients (only the order of additions differs).
    grads = jax.jit(T.accumulate_gradients, static_argnums=(2, 3))
    g1, (ce1, _, n1) = grads(params, batch, config, train)
    g4, (ce4, _, n4) = grads(params, batch, config, acc)
    assert n1 == n4
    np.testing.assert_allclose(ce1, ce4, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(a).max())),
                 g1, g4)

    step = jax.jit(T.train_step, static_argnums=(2, 3))
    big, m1 = step(optim.init_state(config, train, jax.random.key(0)), batch, config, train)
    small, m4 = step(optim.init_state(config, train, jax.random.key(0)), batch, config, acc)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    # The updated parameters: Adam's first step moves each weight by lr * g / (|g| + eps) (plus decay), so a weight
    # whose gradient is near zero turns a last-bit difference in g into a visible one. Allowed per weight: lr times
    # the change of g / (|g| + eps) between the two accumulated gradients (after the same clipping), doubled.
    clip = min(1.0, train.grad_clip / float(optax.global_norm(jax.tree.map(lambda g: g / n1, g1))))

    def check(p1, p4, a, b):
        a, b = np.asarray(a) / float(n1) * clip, np.asarray(b) / float(n1) * clip
        shift = np.abs(a / (np.abs(a) + train.eps) - b / (np.abs(b) + train.eps))
        np.testing.assert_array_less(np.abs(np.asarray(p1) - np.asarray(p4)),
                                     2 * train.lr * shift + 1e-6 * np.abs(np.asarray(p1)) + 1e-7)

    jax.tree.map(check, big.params, small.params, g1, g4)


def test_chunked_loss_equals_plain_cross_entropy():
    config, train, batch = small_setup(z_loss=1e-3)
    params = lj.init_params(config, jax.random.key(0))
    logits = lj.forward(params, batch["tokens"], config, batch["positions"], batch["segment_ids"])
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    expected = jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])
    for chunk in (5, 4096):
        t = TrainConfig(**{**train.__dict__, "loss_chunk": chunk})
        obj, (ce, z, n) = T.loss_sums(params, batch, config, t)
        np.testing.assert_allclose(ce / n, expected, rtol=1e-5)
        lse = jax.nn.logsumexp(logits, -1)
        np.testing.assert_allclose(z, jnp.sum(lse**2 * batch["loss_mask"]), rtol=1e-5)
        g1 = jax.grad(lambda p: T.loss_sums(p, batch, config, t)[0])(params)
        g0 = jax.grad(lambda p: T.loss_sums(p, batch, config, train)[0])(params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


def _dot_contractions(jaxpr):
    """Contracting-axis counts of every dot_general in a jaxpr, nested ones (scan, remat, map) included."""
    counts = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            counts.append(len(eqn.params["dimension_numbers"][0][0]))
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    counts += _dot_contractions(inner)
    return counts


@pytest.mark.parametrize("scan_layers", [True, False])
def test_loss_gradient_contracts_one_token_axis(scan_layers):
    # Weight gradients that contracted batch and sequence as two axes made XLA:CPU write the SwiGLU backward's
    # gradients transposed (docs/benchmarks-log.md, training step); the products flatten tokens to avoid it.
    config, train, batch = small_setup()
    config = dataclasses.replace(config, scan_layers=scan_layers)
    params = lj.init_params(config, jax.random.key(0))
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: T.loss_sums(p, batch, config, train)[0]))(params).jaxpr
    counts = _dot_contractions(jaxpr)
    assert len(counts) > 20 and max(counts) == 1, counts
    # The same through the public forward (LM head included), as a user's own loss would differentiate it.
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: lj.forward(p, batch["tokens"], config).sum()))(params).jaxpr
    counts = _dot_contractions(jaxpr)
    assert len(counts) > 20 and max(counts) == 1, counts


@pytest.mark.parametrize("schedule", ["cosine", "constant", "wsd"])
def test_lr_schedules(schedule):
    t = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule=schedule, decay_fraction=0.2)
    f = optim.lr_schedule(t)
    # The warm-up's steps 0..9 take 0.1, 0.2, ..., 1.0: the first step learns, the tenth reaches the peak.
    assert [float(f(s)) for s in (0, 4, 9, 10)] == pytest.approx([0.1, 0.5, 1.0, 1.0])
    end = {"cosine": 0.1, "constant": 1.0, "wsd": 0.1}[schedule]
    assert float(f(100)) == pytest.approx(end, abs=1e-6)
    if schedule == "wsd":
        assert float(f(79)) == pytest.approx(1.0) and float(f(90)) == pytest.approx(0.55, abs=1e-6)


# --- multiple devices ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eight_devices_match_one_device(corpus, tmp_path, dtype):
    # bfloat16 also covers the CPU's bfloat16 products (llama_jax/matmul.py) on sharded operands; its products
    # round to bfloat16 after summing in a different order per sharding, hence the looser tolerance.
    assert jax.device_count() >= 8
    common = ["--train.steps=6", "--train.eval_every=100", "--train.save_every=100", f"--model.dtype={dtype}"]
    assert train_cli.main(train_args(corpus, tmp_path / "one", *common)) == 0
    assert train_cli.main(train_args(corpus, tmp_path / "eight", *common, "--mesh", "data=2,fsdp=2,tensor=2")) == 0
    a, b = losses(tmp_path / "one"), losses(tmp_path / "eight")
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)],
                               rtol=2e-5 if dtype == "float32" else 1e-2)


def test_resume_continues_the_run_in_the_directory_whatever_the_preset_says(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    preset = str(ROOT / "configs" / "tiny.yaml")
    assert train_cli.main(["--config", preset, *train_args(corpus, run, "--train.steps=4", "--train.eval_every=4",
                                                           "--train.save_every=4")]) == 0
    saved, tokens = (run / "config.yaml").read_text(), (run / "data" / "meta.json").read_text()
    # The README's resume command: the preset named again, no --data.path. The preset's own data.path (null: the
    # default corpus) and model change nothing; the run goes on with its own data, tokenizer and model.
    assert train_cli.main(["--config", preset, "--run-dir", str(run), "--resume", "--train.steps=6"]) == 0
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]
    assert (run / "data" / "meta.json").read_text() == tokens  # nothing tokenized again
    assert (run / "config.yaml").read_text() == saved.replace("steps: 4", "steps: 6")
    capsys.readouterr()
    # A flag that would change the data is refused in one line naming the key and both values; nothing changes.
    other = tmp_path / "other.txt"
    other.write_text("another corpus entirely\n" * 50)
    for flag, key in ((f"--data.path={other}", "data.path"), ("--train.seed=5", "train.seed"),
                      ("--train.batch_size=16", "train.batch_size")):
        assert train_cli.main(["--run-dir", str(run), "--resume", flag, "--train.steps=8"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{key} would change (saved " in err[0] and "now " in err[0], err
    assert (run / "config.yaml").read_text() == saved.replace("steps: 4", "steps: 6")
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]


def test_mfu_never_reads_above_100_percent_and_a_warmup_longer_than_the_run_is_said(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    # A stated peak far below what the machine does (as a start-up timing on a loaded CPU can be): MFU is measured
    # against the best rate the run itself shows, never above it.
    assert train_cli.main(train_args(corpus, run, "--train.steps=6", "--train.warmup_steps=10",
                                     "--train.peak_flops=1000")) == 0
    rows = read_metrics(run / "metrics.jsonl")
    mfu = [r["mfu"] for r in rows if "mfu" in r]
    assert mfu and all(0 < m <= 1.0 for m in mfu) and max(mfu) == 1.0
    assert "train.warmup_steps=10 is more than train.steps=6" in capsys.readouterr().err
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[0] == pytest.approx(3e-3 / 10) and lrs == sorted(lrs)  # the first step already learns


def test_the_progress_bar_shows_each_step_with_its_own_loss(tmp_path):
    import io

    from tqdm import tqdm

    from llama_jax.train import loop
    from llama_jax.train.metrics import MetricsWriter

    out = io.StringIO()
    bar = tqdm(total=5, file=out, mininterval=0, miniters=1)  # every update drawn
    tc = TrainConfig(steps=5, log_every=100)
    writer = MetricsWriter(tmp_path, enabled=False)
    for step in range(1, 5):
        metrics = {"loss": 1.0 + step, "lr": step * 1e-3, "grad_norm": 1.0, "z_loss": 0.0}
        loop._log(step, metrics, None, writer, bar, tc)
    frames = [f for f in out.getvalue().replace("\r", "\n").splitlines() if "loss=" in f]
    shown = {int(f.split("|")[2].split("/")[0]): f.split("loss=")[1].split(",")[0] for f in frames}
    assert shown == {1: "2.000", 2: "3.000", 3: "4.000", 4: "5.000"}, frames


def test_checkpoint_restores_onto_another_mesh(corpus, tmp_path):
    common = ["--train.eval_every=100", "--train.save_every=3"]
    assert train_cli.main(train_args(corpus, tmp_path / "ref", *common, "--train.steps=6")) == 0
    run = tmp_path / "run"
    assert train_cli.main(train_args(corpus, run, *common, "--train.steps=6", "--mesh", "fsdp=8")) == 0
    shutil.rmtree(run / "checkpoints" / "6")
    assert train_cli.main(train_args(corpus, run, *common, "--train.steps=6", "--mesh", "data=2,tensor=4",
                                     "--resume")) == 0
    a, b = losses(tmp_path / "ref"), losses(run)
    np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=2e-5)


def test_param_specs_shard_matrices_and_replicate_norms():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    config = lj.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_dim=64)
    specs = sharding.param_specs(jax.eval_shape(lambda: lj.init_params(config, jax.random.key(0))), mesh)
    P = jax.sharding.PartitionSpec
    assert specs["layers"]["wq"] == P(None, "fsdp", "tensor") and specs["layers"]["wo"] == P(None, "tensor", "fsdp")
    assert specs["layers"]["attn_norm"] == P(None, None) and specs["embed"] == P("fsdp", "tensor")
    with pytest.raises(lj.ConfigError, match="expected comma-separated AXIS=N"):
        sharding.parse_mesh("data=2,pipeline=2")


def test_metrics_jsonl_rows_are_json_and_eval_paths_score_as_eval_perplexity(corpus, tmp_path):
    from llama_jax import eval as ev

    run = tmp_path / "r"
    (tmp_path / "held.txt").write_text("the river stone fire crown night " * 30)
    assert train_cli.main(train_args(corpus, run, "--train.steps=3", "--train.eval_every=3",
                                     f"--train.eval_paths=held={tmp_path / 'held.txt'}")) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in row for row in rows) and any("tokens_seen" in row for row in rows)
    held = next(row for row in rows if "eval_held_loss" in row)
    ckpt = lj.load_checkpoint(run)
    got = ev.perplexity(ckpt.params, ckpt.config, ckpt.tokenizer, [tmp_path / "held.txt"], window=32, stride=16)
    assert held["step"] == 3 and held["eval_held_loss"] == pytest.approx(got["total"]["nll"], rel=1e-6)
    assert held["eval_held_bpb"] == pytest.approx(got["total"]["bits_per_byte"], rel=1e-6)
    # A missing evaluation file is refused before anything is written.
    assert train_cli.main(train_args(corpus, tmp_path / "r2", "--train.eval_paths=nope.txt")) == 2
    assert not (tmp_path / "r2" / "config.yaml").exists()
