"""One loader for every kind of checkpoint: point it at what you have.

    ckpt = lj.load_checkpoint("runs/tiny")                  # a training run directory (newest usable step)
    ckpt = lj.load_checkpoint("hf/SmolLM2-135M")            # a Hugging Face directory
    ckpt = lj.load_checkpoint("stories15M.bin", tokenizer="tokenizer.model")   # a llama2.c file
    ckpt = lj.load_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")   # a GGUF file (llama.cpp, Ollama)
    ckpt = lj.load_checkpoint("runs/lora")                  # a LoRA run: its base with the adapters merged
    ckpt = lj.load_checkpoint("hf/SmolLM2-135M", adapter="my-peft-adapter")   # any base + a PEFT adapter

gives the config, the parameter pytree, the tokenizer (SentencePiece or Hugging Face `tokenizers`), the chat
template (the checkpoint's own Jinja template, or the project's for runs trained here), the stop tokens (every
`eos_token_id` of generation_config.json, the tokenizer's EOS and the template's end-of-turn token) and where it
all came from.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from llama_jax import lora
from llama_jax.checkpoints.gguf import is_gguf, read_gguf
from llama_jax.checkpoints.hf import CheckpointError, load_hf_checkpoint
from llama_jax.checkpoints.llama2c import load_llama2c
from llama_jax.checkpoints.peft import load_peft_adapter
from llama_jax.checkpoints.run_dir import load_run_params, run_config_of, tokenizer_of
from llama_jax.config import ConfigError, LoraConfig, ModelConfig
from llama_jax.text import chat_template
from llama_jax.text.tokenizer import HFTokenizer, TokenizerError, load_tokenizer


@dataclasses.dataclass(frozen=True)
class Adapter:
    """The low-rank adapters merged into a Checkpoint's params, kept apart for export (lora.py)."""
    adapters: dict
    lora: LoraConfig
    base: str  # the base's path


@dataclasses.dataclass
class Checkpoint:
    config: ModelConfig
    params: dict  # ready to use: a LoRA run's or a PEFT adapter's update already merged in
    tokenizer: object  # tokenizer.Tokenizer (SentencePiece) or tokenizer.HFTokenizer
    chat_template: str | None  # Jinja source; None when the checkpoint has none (a base model)
    stop_tokens: tuple[int, ...]
    source: str  # "run directory runs/tiny, step 200", "Hugging Face directory ...", "llama2.c file ..."
    adapter: Adapter | None = None


def load_checkpoint(path: str | Path, step: int | None = None, tokenizer: str | Path | None = None,
                    flags: tuple[str, str] = ("--checkpoint", "--tokenizer"), adapter: str | Path | None = None
                    ) -> Checkpoint:
    """Reads a training run directory (step: which checkpoint; default the newest usable one), a Hugging Face
    directory, a GGUF file or a llama2.c `.bin` file. `tokenizer` (a tokenizer.model, a tokenizer.json or a
    directory) replaces the checkpoint's own; a llama2.c file, which has none, finds tokenizer.model beside it.
    A LoRA run directory loads the base it records (refusing a different one) and merges its adapters; `adapter`
    (a PEFT LoRA directory) is merged into any checkpoint. One-line errors, which name the path and the tokenizer
    by `flags` (the caller's names for them)."""
    path = Path(path)
    kind = checkpoint_kind(path, flags[0])
    if step is not None and kind != "run":
        raise ConfigError(f"--step {step}: {path} is not a training run directory, so it has no steps")
    if tokenizer is not None and not Path(tokenizer).exists():
        raise ConfigError(f"{flags[1]} {tokenizer}: no such file or directory")
    if adapter is not None and not Path(adapter).exists():
        raise ConfigError(f"--adapter {adapter}: no such file or directory")
    generation, applied = {}, None
    if kind == "run":
        config, params, meta = load_run_params(path, step)
        tok = load_tokenizer(tokenizer) if tokenizer else tokenizer_of(meta, path)
        template = tok.chat_template or chat_template.PROJECT_TEMPLATE
        source = f"run directory {path}, step {meta['step']}"
        if meta.get("lora_base"):
            params, applied = _lora_run(path, params, meta)
    elif kind == "gguf":
        config, params, tokenizer_files = read_gguf(path)
        tok = load_tokenizer(tokenizer) if tokenizer else HFTokenizer(path, files=tokenizer_files)
        template, source = tok.chat_template, f"GGUF file {path}"
    elif kind == "llama2c":
        config, params = load_llama2c(path)
        tok = load_tokenizer(tokenizer or _beside(path.parent, path, flags[1]))
        template, source = None, f"llama2.c file {path}"
    else:
        config, params = load_hf_checkpoint(path)
        tok = load_tokenizer(tokenizer or _beside(path, path, flags[1]))
        template = getattr(tok, "chat_template", None)
        if template is None and tok.token_id(chat_template.END) is not None:
            template = chat_template.PROJECT_TEMPLATE  # a run trained here, exported by an older version
        generation = _generation_config(path)
        source = f"Hugging Face directory {path}"
    if adapter is not None:
        if applied is not None:
            raise ConfigError(f"--adapter {adapter}: {path} is a LoRA run, which applies its own adapters already")
        adapters, lora_config = load_peft_adapter(adapter, config)
        params = lora.merge_adapters(params, adapters, lora_config)
        applied, source = Adapter(adapters, lora_config, str(path)), f"{source} + PEFT adapter {adapter}"
    if tok.vocab_size > config.vocab_size:
        raise ConfigError(f"{tok.model_file}: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary "
                          f"is {config.vocab_size}; they do not belong together")
    eos = generation.get("eos_token_id")
    listed = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    stops = [*listed, tok.eos_id, *(chat_template.template_stop_tokens(tok, template) if template else ())]
    stops = tuple(dict.fromkeys(int(t) for t in stops if isinstance(t, int) and 0 <= t < config.vocab_size))
    return Checkpoint(config, params, tok, template, stops, source, applied)


def _lora_run(path: Path, adapters, meta: dict):
    """A LoRA run's (merged params, Adapter): its base, read from where the run found it, must be that base."""
    record, run_config = meta["lora_base"], run_config_of(meta)
    base_path = Path(record["path"])
    if not base_path.exists():
        raise CheckpointError(f"{path}: the base this LoRA run adapts, {base_path}, is gone (train.init_from); put it "
                              "back, or export the merged model while you have it")
    base = load_checkpoint(base_path, flags=(f"{path}'s base", "--tokenizer"))
    found = lora.fingerprint(base.params)
    if found != record["fingerprint"]:
        raise CheckpointError(f"{path}: its base {base_path} has changed since the adapters were trained (fingerprint "
                              f"{found}, recorded {record['fingerprint']})")
    merged = lora.merge_adapters(base.params, adapters, run_config.lora)
    return merged, Adapter(adapters, run_config.lora, str(base_path))


def _beside(directory: Path, checkpoint: Path, flag: str) -> Path:
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer.model").is_file():
        return directory
    raise TokenizerError(f"{checkpoint}: no tokenizer.json or tokenizer.model beside the checkpoint (name one "
                         f"with {flag})")


def _generation_config(path: Path) -> dict:
    f = path / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        config = json.loads(f.read_text())
    except ValueError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    return config if isinstance(config, dict) else {}


def checkpoint_kind(path: str | Path, flag: str = "--checkpoint") -> str:
    """"run" (a training run directory: config.yaml and checkpoints/), "hf" (a Hugging Face directory:
    config.json and safetensors weights), "gguf" (a file starting with GGUF's magic bytes) or "llama2c" (a llama2.c
    .bin file); anything else, or a directory that is both a run and a Hugging Face checkpoint, is a one-line
    error."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{flag} {path}: no such file or directory")
    if is_gguf(path):
        return "gguf"
    if path.is_file() and path.suffix == ".gguf":
        raise ConfigError(f"{flag} {path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    if path.is_file() and path.suffix == ".bin":
        return "llama2c"
    if not path.is_dir():
        raise ConfigError(f"{flag} {path}: expected a training run directory, a Hugging Face directory, a GGUF "
                          "file or a llama2.c .bin file")
    is_run = (path / "checkpoints").is_dir() and (path / "config.yaml").is_file()
    is_hf = (path / "config.json").is_file() and any(path.glob("*.safetensors*"))
    if is_run and is_hf:
        raise ConfigError(f"{flag} {path}: holds both a training run (config.yaml, checkpoints/) and a Hugging Face "
                          "checkpoint (config.json, *.safetensors); move one of them to its own directory")
    if is_run:
        return "run"
    if is_hf:
        return "hf"
    if (path / "checkpoints").is_dir():
        raise ConfigError(f"{flag} {path}: has checkpoints/ but no config.yaml (not a training run directory)")
    if (path / "config.json").is_file():
        raise ConfigError(f"{flag} {path}: has config.json but no *.safetensors weights (not a Hugging Face "
                          "checkpoint directory with safetensors weights)")
    raise ConfigError(f"{flag} {path}: neither a training run directory (config.yaml and checkpoints/) nor a "
                      "Hugging Face Llama directory (config.json and *.safetensors) nor a GGUF or llama2.c file")
