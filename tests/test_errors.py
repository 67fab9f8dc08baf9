"""The error contract of every command: a `UserError` is one line and exit 2; anything else is a bug, which reaches
the user as a traceback and exit 1 instead of being dressed up as their mistake."""

import ast
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import llama_jax as lj
from llama_jax import errors
from llama_jax.checkpoints import load
from llama_jax.cli import main
from llama_jax.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# Each command, pointed at a checkpoint: the loader's format detection (deep inside load_checkpoint) is made to fail.
COMMANDS = {
    "generate": ["--checkpoint", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "2"],
    "serve": ["--checkpoint", "{ckpt}", "--port", "0"],
    "eval": ["perplexity", "--checkpoint", "{ckpt}", "--data", "{ckpt}"],
    "hf": ["export", "--checkpoint", "{ckpt}", "--out", "{out}"],
    "train": ["--config", "tiny", "--run-dir", "{out}", "--init-from", "{ckpt}", "--train.steps", "1"],
}


def _fail_inside_the_loader(monkeypatch, error):
    def checkpoint_kind(path, flag="--checkpoint"):
        raise error

    monkeypatch.setattr(load, "checkpoint_kind", checkpoint_kind)
    import llama_jax.cli.hf

    monkeypatch.setattr(llama_jax.cli.hf, "checkpoint_kind", checkpoint_kind)


def _argv(command, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "a.txt").write_text("some text")
    return [a.format(ckpt=ckpt, out=tmp_path / "out") for a in COMMANDS[command]]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bug_deep_in_the_loader_is_not_reported_as_a_user_error(command, tmp_path, monkeypatch, capsys):
    _fail_inside_the_loader(monkeypatch, ValueError("a bug: an index went wrong"))
    with pytest.raises(ValueError, match="a bug"):
        main(command, _argv(command, tmp_path))
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_user_error_deep_in_the_loader_is_one_line_and_exit_2(command, tmp_path, monkeypatch, capsys):
    _fail_inside_the_loader(monkeypatch, ConfigError("--checkpoint ckpt: neither a run nor a model"))
    assert main(command, _argv(command, tmp_path)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1] == "error: --checkpoint ckpt: neither a run nor a model", lines
    assert not any(line.startswith("error:") for line in lines[:-1])


def test_a_bug_ends_the_process_with_a_traceback_and_exit_1(tmp_path):
    code = ("import sys\n"
            "from llama_jax.checkpoints import load\n"
            "def kind(path, flag='--checkpoint'): raise ValueError('a bug: an index went wrong')\n"
            "load.checkpoint_kind = kind\n"
            "sys.argv = ['generate.py', *sys.argv[1:]]\n"
            "from llama_jax.cli import run\n"
            "run('generate')\n")
    r = subprocess.run([sys.executable, "-c", code, *_argv("generate", tmp_path)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "Traceback" in r.stderr and r.stderr.strip().splitlines()[-1] == "ValueError: a bug: an index went wrong"


def test_every_one_line_error_class_is_a_user_error_and_keeps_its_builtin_base():
    from llama_jax.checkpoints.hf import CheckpointError
    from llama_jax.checkpoints.llama2c import Llama2cError
    from llama_jax.checkpoints.run_dir import ResumeError, SaveError
    from llama_jax.cli.generate import UsageError
    from llama_jax.data.token_files import DataError
    from llama_jax.eval import EvalError
    from llama_jax.text.chat_template import ChatTemplateError
    from llama_jax.text.tokenizer import TokenizerError
    from llama_jax.text.tokenizer_json import ConversionError
    from llama_jax.train.loop import TrainingDiverged

    for cls in (ConfigError, DataError, TokenizerError, ConversionError, ChatTemplateError, CheckpointError,
                Llama2cError, ResumeError, EvalError, UsageError, errors.ArgumentError):
        assert issubclass(cls, errors.UserError) and issubclass(cls, ValueError), cls
    for cls in (SaveError, TrainingDiverged):
        assert issubclass(cls, errors.UserError) and issubclass(cls, RuntimeError), cls
    assert lj.UserError is errors.UserError


def _handled(handler: ast.ExceptHandler) -> set[str]:
    t = handler.type
    names = t.elts if isinstance(t, ast.Tuple) else [t] if t is not None else []
    return {ast.unparse(n) for n in names} or {"<bare>"}


def test_no_command_catches_what_a_bug_raises():
    for path in (ROOT / "llama_jax" / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler):
                caught = _handled(node)
                assert not caught & {"ValueError", "RuntimeError", "TypeError", "Exception", "BaseException",
                                     "<bare>"}, f"{path.name}:{node.lineno} catches {caught}"


def test_the_engine_names_the_request_field_it_refuses():
    from llama_jax.serve.engine import Engine, Request

    config = lj.ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=16)
    engine = Engine(lj.init_params(config, jax.random.key(0)), config, tokenizer=None, max_batch=1)
    refused = [(Request([1, 2], 4, top_p=2.0), "top_p"), (Request([1, 2], 4, temperature=-1), "temperature"),
               (Request([], 4), "prompt"), (Request([99], 4), "prompt"), (Request([1] * 16, 4), "prompt"),
               (Request([1], 0), "max_tokens"), (Request([1], 2, logprobs=99), "logprobs"),
               (Request([1], 2, top_k=-3), "top_k")]
    for request, param in refused:
        with pytest.raises(errors.ArgumentError) as caught:
            engine.submit(request)
        assert caught.value.param == param, (request, caught.value)
