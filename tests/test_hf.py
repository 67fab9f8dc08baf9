import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llama_jax as lj
from llama_jax.cli import hf as hf_cli
from tests.hf_util import make_hf_llama

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}


@pytest.mark.parametrize("kwargs", [
    dict(),                                              # multi-head attention
    dict(kv_heads=2),                                    # grouped-query attention
    dict(kv_heads=1, tied=True),                         # multi-query, tied embeddings
    dict(kv_heads=2, rope_scaling=LLAMA3_ROPE),          # Llama 3.1 RoPE scaling
    dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
], ids=["mha", "gqa", "mqa-tied", "llama3-rope", "linear-rope"])
def test_logits_match_transformers(tmp_path, kwargs):
    hf = make_hf_llama(tmp_path, **kwargs)
    config, params = lj.load_hf_checkpoint(tmp_path)
    assert config.tie_embeddings == kwargs.get("tied", False) and ("lm_head" in params) != config.tie_embeddings
    tokens = np.random.RandomState(0).randint(0, 128, (2, 100))  # past original_max_positions, so scaling matters
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    logits = np.asarray(lj.forward(params, jnp.asarray(tokens), config))
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    make_hf_llama(tmp_path / "one", kv_heads=2)
    config, params = lj.load_hf_checkpoint(tmp_path / "one")
    lj.save_hf_checkpoint(tmp_path / "sharded", config, params, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    config2, params2 = lj.load_hf_checkpoint(tmp_path / "sharded")
    assert config2 == config
    for a, b in zip(np.asarray(params["layers"]["wq"]), np.asarray(params2["layers"]["wq"])):
        np.testing.assert_array_equal(a, b)


def test_unsupported_architecture_and_rope_fail_in_one_line(tmp_path):
    make_hf_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    bad = dict(cfg, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(lj.CheckpointError, match="unsupported architecture.*supported: LlamaForCausalLM"):
        lj.load_hf_checkpoint(tmp_path)
    bad = dict(cfg, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    bad.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(lj.CheckpointError, match="rope type 'yarn' is not supported; supported: default"):
        lj.load_hf_checkpoint(tmp_path)


def test_missing_files_fail_in_one_line(tmp_path):
    with pytest.raises(lj.CheckpointError, match="no config.json"):
        lj.load_hf_checkpoint(tmp_path)
    make_hf_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(lj.CheckpointError, match="no model.safetensors"):
        lj.load_hf_checkpoint(tmp_path)


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    import transformers

    config = lj.ModelConfig(vocab_size=120, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=80,
                            max_seq_len=64, rope_scaling="llama3", rope_factor=4.0, rope_original_max_positions=16)
    params = lj.init_params(config, __import__("jax").random.key(3))
    lj.save_hf_checkpoint(tmp_path, config, params)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    tokens = np.random.RandomState(1).randint(0, 120, (2, 40))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(lj.forward(params, jnp.asarray(tokens), config))
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("tied", [False, True])
def test_hf_to_ours_to_hf_is_bit_identical(tmp_path, tied):
    from safetensors.numpy import load_file

    make_hf_llama(tmp_path / "a", kv_heads=2, tied=tied)
    config, params = lj.load_hf_checkpoint(tmp_path / "a")
    lj.save_hf_checkpoint(tmp_path / "b", config, params)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    if tied:
        a.pop("lm_head.weight", None)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_import_and_export_commands_round_trip_with_tokenizer(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from llama_jax.text.tokenizer import train_tokenizer

    root = Path(__file__).resolve().parents[1]
    hf_dir = tmp_path / "hf"
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog\n" * 50 + "0123456789 ,.!?"], 320,
                          hf_dir / "tokenizer.model")
    make_hf_llama(hf_dir, vocab_size=tok.vocab_size, kv_heads=2)
    run = lambda *a: subprocess.run([sys.executable, "-m", "llama_jax.hf", *a], capture_output=True, text=True,
                                    cwd=root)
    r = run("import", "--checkpoint", str(hf_dir), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    r = run("export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == (hf_dir / "tokenizer.model").read_bytes()
    c1, p1 = lj.load_hf_checkpoint(hf_dir)
    c2, p2 = lj.load_hf_checkpoint(tmp_path / "back")
    assert c1 == c2
    for a, b in zip(jax_leaves(p1), jax_leaves(p2)):
        np.testing.assert_array_equal(a, b)
    r = run("import", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: --checkpoint {tmp_path / 'nope'}: no such file or " \
                                                     "directory"


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _random_weights(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if "norm" in name else torch.randn_like(p) * 0.15)
    return model.eval()


@pytest.mark.parametrize("kind", ["llama-head_dim", "mistral-no-window", "mistral-window-at-context"])
def test_llama_style_configurations_seen_in_the_wild(tmp_path, kind):
    import transformers

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    if kind == "llama-head_dim":  # an explicit head_dim, not hidden_size / num_attention_heads (16)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, head_dim=32))
    else:
        window = None if kind == "mistral-no-window" else 64
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=window))
    _random_weights(model).save_pretrained(tmp_path)
    config, params = lj.load_hf_checkpoint(tmp_path)
    if kind == "llama-head_dim":
        assert config.head_dim == 32 and params["layers"]["wq"].shape == (2, 64, 128)
    tokens = np.random.RandomState(0).randint(0, 128, (2, 40))
    with torch.no_grad():
        expected = model(torch.tensor(tokens)).logits.numpy()
    logits = np.asarray(lj.forward(params, jnp.asarray(tokens), config))
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()
    # Exported again, transformers reads the same model back.
    lj.save_hf_checkpoint(tmp_path / "back", config, params)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(tokens)).logits.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_a_sliding_window_shorter_than_the_context_is_refused_in_one_line(tmp_path):
    import transformers

    config = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=64, sliding_window=16)
    transformers.MistralForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(lj.CheckpointError, match="sliding_window=16 is shorter than the context "
                                                 "max_position_embeddings=64"):
        lj.load_hf_checkpoint(tmp_path)


def test_export_behaves_like_the_project_in_auto_tokenizer_and_llama(tmp_path):
    """An export of a run trained here: AutoTokenizer gives the same ids (BOS included) and chat rendering, and
    LlamaForCausalLM the same greedy tokens."""
    import transformers

    from llama_jax.checkpoints import run_dir as checkpoint
    from llama_jax.text import chat_template as chat
    from llama_jax.text.tokenizer import HFTokenizer, load_tokenizer, train_tokenizer

    text = "The king rode to the castle at night, and the queen waited.  Two  spaces\n\tand a tab. 世界 🦊\n"
    tok = train_tokenizer([text * 20], 300, tmp_path / "tok" / "tokenizer.model")
    make_hf_llama(tmp_path / "src", vocab_size=320, hidden_size=64, layers=2, heads=4, kv_heads=2, ffn=96)
    (tmp_path / "src" / "tokenizer.model").write_bytes(tok.model_bytes)
    assert hf_cli.main(["import", "--checkpoint", str(tmp_path / "src"), "--out", str(tmp_path / "run")]) == 0
    assert hf_cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    as_json = load_tokenizer(tmp_path / "out")  # tokenizer.json, as tools that read only that file see it
    assert isinstance(as_json, HFTokenizer)
    for t in (text, " leading space", "x<|user|>y<|end|>", "世界上最高的山峰是哪座?"):
        assert auto(t)["input_ids"] == tok.encode(t, bos=True) == as_json.encode(t, bos=True), t
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"}]
    rendered = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == chat.render_template(chat.PROJECT_TEMPLATE, messages, True, {"bos_token": "<s>"})
    ids = auto.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    assert ids == chat.encode_conversation(tok, chat.PROJECT_TEMPLATE, messages, True)
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_id, tok.token_id("<|end|>")]
    llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    prompt = tok.encode("The king", bos=True)
    with torch.no_grad():
        ref = llama.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)[0]
    config, params, _ = checkpoint.load_run_params(tmp_path / "run")
    ours = lj.generate(params, config, [prompt], max_new_tokens=10, temperature=0.0)[0]
    assert ours == ref[len(prompt):].tolist()
