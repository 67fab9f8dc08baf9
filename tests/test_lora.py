"""LoRA: adapters as a second pytree, training them on a frozen base, and PEFT's adapter directories both ways,
checked against PEFT itself on a small random Hugging Face Llama."""

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import lora, model
from llama_jax.checkpoints import run_dir as checkpoint
from llama_jax.checkpoints.load import load_checkpoint
from llama_jax.checkpoints.peft import save_peft_adapter
from llama_jax.cli import generate as generate_cli
from llama_jax.cli import hf as hf_cli
from llama_jax.cli import train as train_cli
from llama_jax.config import LoraConfig
from llama_jax.train.metrics import read_metrics
from tests.test_bad_inputs import assert_one_error_line, write_corpus

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=320, hidden_size=64, layers=2, heads=4, kv_heads=2, ffn=96, max_positions=128)
TRAIN = ["--train.seq_len=32", "--train.batch_size=8", "--train.warmup_steps=2", "--train.lr=1e-2",
         "--train.eval_batches=2", "--train.log_every=1", "--train.peak_flops=1e12", "--train.eval_every=100",
         "--lora.rank=4", "--lora.alpha=8"]


def _make_base(path: Path, corpus: Path, seed: int = 0) -> Path:
    from llama_jax.text.tokenizer import train_tokenizer
    from tests.hf_util import make_hf_llama

    make_hf_llama(path, seed=seed, **SHAPE)
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    train_tokenizer(texts, SHAPE["vocab_size"], path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), n=20)


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus):
    return _make_base(tmp_path_factory.mktemp("base") / "hf", corpus)


@pytest.fixture(scope="module")
def run(tmp_path_factory, base, corpus):
    """A LoRA run of 6 steps on the base (checkpoints 3 and 6)."""
    d = tmp_path_factory.mktemp("lora") / "run"
    assert train_cli.main([*TRAIN, f"--data.path={corpus}", "--init-from", str(base), "--run-dir", str(d),
                           "--train.steps=6", "--train.save_every=3"]) == 0
    return d


TOKENS = np.array([[1, 5, 9, 33, 70, 120, 200, 7, 3, 18], [1, 44, 2, 90, 61, 17, 5, 250, 11, 8]], np.int32)


def _hf_logits(hf_model) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


def _peft_model(base: Path, adapter: Path):
    """PEFT applying `adapter`, with warnings as errors: PEFT only warns about keys it did not find, and then
    applies nothing (libraries' notices of their own deprecations aside)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return peft.PeftModel.from_pretrained(hf, adapter).eval()


def test_a_new_adapter_changes_nothing_and_merging_equals_applying(base):
    ckpt = load_checkpoint(base)
    lc = LoraConfig(rank=4, alpha=8.0, targets="wq,wv,w_down")
    ad = lora.init_adapters(ckpt.config, lc, jax.random.key(0))
    plain = model.forward(ckpt.params, TOKENS, ckpt.config)
    np.testing.assert_array_equal(model.forward(ckpt.params, TOKENS, ckpt.config, adapters=lora.scaled(ad, lc)),
                                  plain)
    ad = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), ad)
    for rslora in (False, True):
        lc = LoraConfig(rank=4, alpha=8.0, targets="wq,wv,w_down", rslora=rslora)
        applied = model.forward(ckpt.params, TOKENS, ckpt.config, adapters=lora.scaled(ad, lc))
        merged = model.forward(lora.merge_adapters(ckpt.params, ad, lc), TOKENS, ckpt.config)
        assert float(jnp.max(jnp.abs(applied - plain))) > 1e-2  # the adapter does something
        np.testing.assert_allclose(applied, merged, atol=2e-5)
    # the scale by hand: alpha / r, or alpha / sqrt(r) with rsLoRA
    w = ckpt.params["layers"]["wq"][0]
    delta = np.asarray(ad["wq"]["a"][0]) @ np.asarray(ad["wq"]["b"][0])
    np.testing.assert_allclose(lora.merge_adapters(ckpt.params, ad, lc)["layers"]["wq"][0], w + 8.0 / 2.0 * delta,
                               atol=1e-6)


def test_our_exported_adapter_gives_peft_our_logits_and_merge_equals_merge_and_unload(run, base, tmp_path):
    ours = load_checkpoint(run)
    assert ours.adapter is not None and all(
        float(jnp.max(jnp.abs(ab["b"]))) > 1e-4 for ab in ours.adapter.adapters.values())  # trained: b is not 0
    our_logits = np.asarray(model.forward(ours.params, TOKENS, ours.config))
    assert hf_cli.main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "adapter")]) == 0
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = _peft_model(base, tmp_path / "adapter")
    peft_logits = _hf_logits(peft_model)
    diff = float(np.max(np.abs(peft_logits - our_logits)))
    print(f"PEFT vs ours, a trained LoRA run's adapter: max |logit difference| = {diff:.2e}")
    assert diff < 1e-4
    assert float(np.max(np.abs(peft_logits - _hf_logits(peft_model.get_base_model().__class__.from_pretrained(
        base))))) > 1e-3  # PEFT did apply it
    # --merge: a full Hugging Face model equal to PEFT's merge_and_unload
    assert hf_cli.main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32)
    unloaded = peft_model.merge_and_unload()
    theirs = dict(unloaded.state_dict())
    worst = max(float((p - theirs[k]).abs().max()) for k, p in merged.state_dict().items())
    print(f"--merge vs PEFT merge_and_unload: max |weight difference| = {worst:.2e}")
    assert worst < 1e-6
    np.testing.assert_allclose(_hf_logits(merged), peft_logits, atol=1e-4)


@pytest.mark.parametrize("targets, rslora", [(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"], False), (["q_proj", "v_proj"], True)])
def test_a_peft_made_adapter_applied_with_adapter_gives_peft_logits(base, tmp_path, capsys, targets, rslora):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
    torch.manual_seed(7)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_rslora=rslora, lora_dropout=0.0,
                             init_lora_weights=False, task_type="CAUSAL_LM")  # random A and B: not a no-op
    made = peft.get_peft_model(hf, config).eval()
    made.save_pretrained(tmp_path / "adapter")
    ours = load_checkpoint(base, adapter=tmp_path / "adapter")
    diff = float(np.max(np.abs(_hf_logits(made) - np.asarray(model.forward(ours.params, TOKENS, ours.config)))))
    print(f"PEFT-made adapter ({len(targets)} targets, rslora={rslora}) through --adapter: max |logit diff| "
          f"= {diff:.2e}")
    assert diff < 1e-4 and "PEFT adapter" in ours.source
    # the command line applies it too
    assert generate_cli.main(["--checkpoint", str(base), "--adapter", str(tmp_path / "adapter"), "--prompt", "the",
                              "--temperature", "0", "--max-new-tokens", "4"]) == 0


def test_training_updates_only_the_adapters_and_resume_is_bit_exact(run, base, corpus, tmp_path):
    # the checkpoint holds adapters and their optimizer state only: every array is adapter-sized
    config, state_params, meta = checkpoint.load_run_params(run)
    shapes = {tuple(s) for ab in lora.adapter_shapes(config, LoraConfig(rank=4)).values() for s in ab.values()}
    mgr = checkpoint.manager(run / "checkpoints", async_save=False)
    raw = mgr.restore(6, args=checkpoint.ocp.args.Composite(state=checkpoint.ocp.args.StandardRestore())).state
    mgr.close()
    sizes = {tuple(x.shape) for x in jax.tree.leaves(raw["opt_state"]) if np.ndim(x) > 0}
    assert sizes <= shapes, sizes
    n_adapter = sum(x.size for x in jax.tree.leaves(raw["params"]))
    assert sum(x.size for x in jax.tree.leaves(raw)) <= 3 * n_adapter + 16  # adapters, Adam's two moments, scalars
    assert n_adapter < 0.1 * model.param_count(config)
    assert meta["lora_base"]["path"] == str(base.resolve())
    # the frozen base is read, never written: its files are as they were, and a step leaves its arrays bit-identical
    digest = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    from llama_jax import optim
    from llama_jax.config import load_run_config
    from llama_jax.train import step as T

    rc = load_run_config(None, [f"train.init_from={base}", "lora.rank=4", "train.seq_len=16", "train.batch_size=2"])
    ckpt = load_checkpoint(base)
    frozen = jax.tree.map(jnp.array, ckpt.params)
    copy = jax.tree.map(np.array, frozen)
    state = optim.init_state(ckpt.config, rc.train, jax.random.key(0), lora.init_adapters(ckpt.config, rc.lora,
                                                                                          jax.random.key(1)))
    step_fn, _ = T.jit_steps(ckpt.config, rc.train, lora=rc.lora)
    batch = {"tokens": TOKENS[:, :8], "targets": TOKENS[:, 1:9], "positions": np.tile(np.arange(8), (2, 1)),
             "loss_mask": np.ones((2, 8), np.float32)}
    before = jax.tree.map(np.array, state.params)
    for _ in range(2):
        state, _ = step_fn(state, batch, frozen)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), copy)
    assert float(np.max(np.abs(np.asarray(state.params["wq"]["b"]) - before["wq"]["b"]))) > 0
    assert hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest() == digest
    # resume: 3 steps, then 3 more from the checkpoint, equal the 6-step run's losses bit for bit
    half = tmp_path / "half"
    common = [*TRAIN, f"--data.path={corpus}", "--init-from", str(base), "--run-dir", str(half),
              "--train.save_every=3"]
    assert train_cli.main([*common, "--train.steps=3"]) == 0
    assert train_cli.main([*common, "--train.steps=6", "--resume"]) == 0
    losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]
    assert losses(half) == losses(run) and len(losses(run)) == 6


def test_lora_mistakes_get_one_line(run, base, corpus, tmp_path, capsys):
    common = [*TRAIN, f"--data.path={corpus}", "--run-dir", str(tmp_path / "x"), "--train.steps=2"]
    for flags, needle in ((["--init-from", str(base), "--lora.rank=-1"], "rank=-1 must be >= 0"),
                          (["--init-from", str(base), "--lora.targets=wq,attn"], "'attn' is not one"),
                          ([], "lora.rank=4 adapts a trained model: give it with --init-from")):
        assert train_cli.main([*common, *flags]) == 2
        assert_one_error_line(capsys.readouterr().err, needle)
    # the base replaced by another model of the same shape: resume and loading both refuse
    other = tmp_path / "other"
    shutil.copytree(run, other)
    moved = tmp_path / "base"
    shutil.copytree(base, moved)
    record = json.loads(json.dumps(checkpoint.load_run_params(other)[2]["lora_base"]))
    assert record["path"] == str(base.resolve())
    _make_base(base.parent / "swap", corpus, seed=5)
    saved = base.parent / "saved"
    base.rename(saved)
    (base.parent / "swap").rename(base)
    try:
        assert generate_cli.main(["--checkpoint", str(other), "--prompt", "the", "--max-new-tokens", "2"]) == 2
        assert_one_error_line(capsys.readouterr().err, "has changed since the adapters were trained")
        assert train_cli.main([*TRAIN, f"--data.path={corpus}", "--init-from", str(base), "--run-dir", str(other),
                               "--train.steps=8", "--resume"]) == 2
        assert_one_error_line(capsys.readouterr().err, "is not the base its adapters were trained on")
    finally:
        shutil.rmtree(base)
        saved.rename(base)
    # a PEFT adapter for another model (other dimensions) is refused in one line
    wide = tmp_path / "wide"
    from tests.hf_util import make_hf_llama

    make_hf_llama(wide, **{**SHAPE, "hidden_size": 32, "heads": 2, "kv_heads": 2})
    hf = transformers.AutoModelForCausalLM.from_pretrained(wide)
    peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "wide-adapter")
    assert generate_cli.main(["--checkpoint", str(base), "--adapter", str(tmp_path / "wide-adapter"), "--prompt",
                              "the", "--max-new-tokens", "2"]) == 2
    assert_one_error_line(capsys.readouterr().err, "an adapter for a different model")
    # what PEFT would apply differently is refused rather than applied wrongly
    save_peft_adapter(tmp_path / "dora", load_checkpoint(run).adapter.adapters, LoraConfig(rank=4), "x")
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert generate_cli.main(["--checkpoint", str(base), "--adapter", str(tmp_path / "dora"), "--prompt", "the",
                              "--max-new-tokens", "2"]) == 2
    assert_one_error_line(capsys.readouterr().err, "use_dora is True")
