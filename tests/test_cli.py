"""What every command shares: the persistent compilation cache (a second start on the same model compiles
nothing new) and the console-script dispatch."""

import os
import subprocess
import sys
from pathlib import Path

from llama_jax import cli
from tests.gguf_util import write_gguf

ROOT = Path(__file__).resolve().parents[1]


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv(cli.CACHE_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cli.compilation_cache_dir() == tmp_path / "xdg" / "llama_jax" / "jax"
    monkeypatch.setenv(cli.CACHE_VARIABLE, str(tmp_path / "mine"))
    assert cli.compilation_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv(cli.CACHE_VARIABLE, "off")
    assert cli.compilation_cache_dir() is None
    monkeypatch.setenv(cli.CACHE_VARIABLE, str(tmp_path / "mine"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))  # JAX's own setting is left alone
    assert cli.compilation_cache_dir() is None


def test_a_second_start_finds_every_program_in_the_cache(tmp_path):
    model = tmp_path / "m.gguf"
    write_gguf(model)
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env |= {cli.CACHE_VARIABLE: str(cache), "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(model), "--prompt", "the world",
            "--max-new-tokens", "4", "--temperature", "0"]

    def start() -> tuple[str, set[str]]:
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return r.stdout, {p.name for p in cache.iterdir()}

    first_text, first = start()
    assert first, "nothing was written to the compilation cache"
    second_text, second = start()
    assert second == first and second_text == first_text  # nothing new compiled; the same greedy text


def test_console_scripts_are_not_shadowed_by_the_command_modules():
    import importlib

    for name in ("train", "generate", "serve", "eval", "hf", "tokenizer"):
        importlib.import_module(f"llama_jax.cli.{name}")  # binds llama_jax.cli.<name> to the module
        assert callable(getattr(cli, f"{name}_command"))
    text = (ROOT / "pyproject.toml").read_text()
    for name in ("train", "generate", "serve", "eval", "hf", "tokenizer"):
        assert f'"llama_jax.cli:{name}_command"' in text
