import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llama_jax as lj
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
    bad = dict(cfg, architectures=["MistralForCausalLM"], model_type="mistral")
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
