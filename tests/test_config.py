from pathlib import Path

import jax
import pytest

import llama_jax as lj
from llama_jax import config as cfg


def test_model_config_is_hashable_and_static():
    c = lj.ModelConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2)
    assert hash(c) == hash(lj.ModelConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2))
    assert c.n_kv_heads == 2 and c.head_dim == 4 and c.ffn_dim == 256
    assert jax.jit(lambda x, c: x * c.dim, static_argnums=1)(1.0, c) == 8.0


@pytest.mark.parametrize("kwargs,message", [
    (dict(dim=100, n_heads=6), "n_heads=6 does not divide dim=100"),
    (dict(dim=64, n_heads=8, n_kv_heads=3), "n_kv_heads=3 does not divide n_heads=8"),
    (dict(dim=48, n_heads=16), "head_dim=3 must be even for RoPE"),
    (dict(dim=0), "dim=0 must be a positive integer"),
    (dict(rope_scaling="yarn"), "rope_scaling='yarn' is not one of none, linear, llama3"),
    (dict(dtype="float16"), "dtype='float16' is not one of float32, bfloat16"),
    (dict(remat="some"), "remat='some' is not one of none, full, save_matmuls"),
])
def test_invalid_model_config_names_the_field(kwargs, message):
    with pytest.raises(lj.ConfigError, match=message.replace("(", r"\(")):
        lj.ModelConfig(**{"dim": 64, "n_heads": 4, **kwargs})


def test_overrides_are_type_checked_and_name_the_key():
    overrides = ["model.n_layers=3", "model.dtype=bfloat16"]
    raw = cfg.apply_overrides({"model": {"dim": 64, "n_heads": 4}}, overrides, ("model",))
    c = cfg.build(lj.ModelConfig, raw["model"], "model")
    assert c.n_layers == 3 and c.dtype == "bfloat16" and c.dim == 64
    with pytest.raises(lj.ConfigError, match=r"model.n_layers='three': expected an integer"):
        cfg.build(lj.ModelConfig, cfg.apply_overrides({}, ["model.n_layers=three"], ("model",))["model"], "model")
    with pytest.raises(lj.ConfigError, match=r"unknown key model.depth"):
        cfg.build(lj.ModelConfig, {"depth": 3}, "model")
    with pytest.raises(lj.ConfigError, match=r"unknown section 'modle'"):
        cfg.apply_overrides({}, ["modle.dim=3"], ("model",))
    with pytest.raises(lj.ConfigError, match=r"expected --section.key=value"):
        cfg.apply_overrides({}, ["dim=3"], ("model",))


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: [1,\n")
    with pytest.raises(lj.ConfigError, match="bad.yaml: invalid YAML at line"):
        lj.load_model_config(bad)
    with pytest.raises(lj.ConfigError, match="missing.yaml: config file not found"):
        lj.load_model_config(tmp_path / "missing.yaml")


def test_presets_load_by_name_from_anywhere(tmp_path, monkeypatch):
    """The installed presets are configs/*.yaml: `--config tiny` (or `configs/tiny.yaml`, copied from the README
    and run outside the repository) reads the same file; an unknown name lists them."""
    root = Path(__file__).resolve().parents[1] / "configs"
    assert cfg.presets() == sorted(p.stem for p in root.glob("*.yaml"))
    monkeypatch.chdir(tmp_path)
    for spelling in ("tiny", "tiny.yaml", "configs/tiny.yaml"):
        assert cfg.load_run_config(spelling, []) == cfg.load_run_config(root / "tiny.yaml", [])
    with pytest.raises(lj.ConfigError, match="tiniest: config file not found .*stories15M, tiny"):
        cfg.load_run_config("tiniest", [])
    (tmp_path / "tiny").write_text("model:\n  dim: 48\n")  # a file of that name wins over the preset
    assert cfg.load_run_config("tiny", []).model.dim == 48
