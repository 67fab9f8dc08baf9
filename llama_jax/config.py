"""Configuration: frozen dataclasses, YAML presets and type-checked `--section.key=value` overrides.

`ModelConfig` is hashable so it can be a static argument to `jax.jit`. Invalid values fail on construction
with a one-line `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from importlib import resources
from pathlib import Path

import yaml

from llama_jax.errors import UserError


class ConfigError(ValueError, UserError):
    """A bad configuration value or file; the message is one line naming the key."""


ROPE_SCALING_TYPES = ("none", "linear", "llama3")
ATTENTION_IMPLS = ("auto", "reference", "jax", "cudnn")
REMAT_POLICIES = ("none", "full", "save_matmuls")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000  # V
    dim: int = 288  # D, the residual stream width
    n_layers: int = 6  # L
    n_heads: int = 6  # N query heads
    n_kv_heads: int | None = None  # K key/value heads (grouped-query attention); None means n_heads
    head_dim: int | None = None  # H, the width of one head; None means dim / n_heads (some models set it apart)
    ffn_dim: int | None = None  # F; None means LLaMA's rule: 2/3 * 4D rounded up to a multiple of 256
    max_seq_len: int = 2048  # longest sequence the model is trained / sampled at
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: str = "none"  # "none", "linear" or "llama3" (Llama 3.1 long-context scaling)
    rope_factor: float = 1.0  # scaling factor for "linear" and "llama3"
    rope_low_freq_factor: float = 1.0  # "llama3" only
    rope_high_freq_factor: float = 4.0  # "llama3" only
    rope_original_max_positions: int = 8192  # "llama3" only: the context length before scaling
    tie_embeddings: bool = False  # the LM head reuses the embedding matrix
    dtype: str = "float32"  # compute dtype; parameters stay float32 and logits are float32
    attention_impl: str = "auto"  # "auto": cuDNN's fused kernel on GPU in 16-bit, else "reference" (plain XLA);
    #                                or force "reference", "jax" (jax.nn.dot_product_attention's choice), "cudnn"
    remat: str = "none"  # what the backward pass keeps: "none" (all), "full" (nothing), "save_matmuls"
    scan_layers: bool = True  # lax.scan over layers (compile time independent of depth); False unrolls them,
    #                           which measured within noise of scan on CPU (docs/benchmarks-log.md) and compiles longer
    init_std: float = 0.02  # std of the normal initialisation of weight matrices

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.ffn_dim is None:
            object.__setattr__(self, "ffn_dim", 256 * -(-(8 * self.dim // 3) // 256))
        explicit_head_dim = self.head_dim is not None
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len") + (
                ("head_dim",) if explicit_head_dim else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not explicit_head_dim:
            if self.dim % self.n_heads:
                raise ConfigError(f"n_heads={self.n_heads} does not divide dim={self.dim}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        for name, allowed in (("rope_scaling", ROPE_SCALING_TYPES), ("attention_impl", ATTENTION_IMPLS),
                              ("remat", REMAT_POLICIES), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("norm_eps", "rope_theta", "rope_factor", "init_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ConfigError("rope_high_freq_factor must be > rope_low_freq_factor for llama3 scaling")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------------------------
# Generic helpers shared by every sectioned config (model, data, train): YAML files and typed overrides.


def _field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value, annotation):
    """Checks/converts `value` (from YAML or the command line) to `annotation`, failing with the key's name."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be None")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return tuple(_coerce(key, v, args[0]) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected an integer") from None
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected a number") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {annotation}")


def build(cls, values: dict, section: str):
    """Builds dataclass `cls` from a dict, checking every key and value type; errors say `section.key`."""
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise ConfigError(f"unknown key {section}.{key} (known: {', '.join(types_)})")
        kwargs[key] = _coerce(f"{section}.{key}", value, types_[key])
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{section}: {e}") from None


PRESETS = "llama_jax.configs"  # the repository's configs/*.yaml, installed with the package (pyproject.toml)


def presets() -> list[str]:
    """The names of the presets installed with the package: `--config tiny` works outside the repository too."""
    try:
        return sorted(f.name[:-5] for f in resources.files(PRESETS).iterdir() if f.name.endswith(".yaml"))
    except ModuleNotFoundError:
        return []


def resolve_config(path: str | Path) -> Path:
    """A config file: the path itself if it exists, else the installed preset it names (`tiny`, `tiny.yaml` or
    `configs/tiny.yaml` run from outside the repository)."""
    path = Path(path)
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml")
    if path.parent in (Path("."), Path("configs")) and name in presets():
        return Path(str(resources.files(PRESETS) / f"{name}.yaml"))
    raise ConfigError(f"{path}: config file not found (installed presets, usable by name as --config NAME: "
                      f"{', '.join(presets()) or 'none'})")


def load_yaml(path: str | Path) -> dict:
    path = resolve_config(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def apply_overrides(raw: dict, overrides: list[str], sections: tuple[str, ...]) -> dict:
    """Applies `section.key=value` strings to a nested dict of raw values (typed later by `build`)."""
    raw = {s: dict(raw.get(s) or {}) for s in sections} | {k: v for k, v in raw.items() if k not in sections}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r}: expected --section.key=value")
        if section not in sections:
            raise ConfigError(f"override {item!r}: unknown section {section!r} (known: {', '.join(sections)})")
        raw[section][name] = _parse_scalar(value)
    return raw


def _parse_scalar(text: str):
    """A command-line value as a YAML scalar: 3 -> int, true -> bool, null -> None; a string keeps its text, with
    backslash escapes read as YAML's double-quoted ones ('\\n\\n' is two newlines). Anything YAML cannot parse
    (globs like *.txt) stays the string as typed."""
    try:
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        value = text
    if isinstance(value, (int, float, bool, type(None))):
        return value
    if "\\" in text:
        try:
            unescaped = yaml.safe_load('"' + text.replace('"', '\\"') + '"')
            if isinstance(unescaped, str):
                return unescaped
        except yaml.YAMLError:
            pass
    return text


def field_comments(cls) -> dict[str, str]:
    """The comment after each field in the class's source, with the comment lines that continue it: the flag help
    of `train.py --help`."""
    import inspect

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^    (\w+): [^#\n]*#\s*(.*(?:\n    #.*)*)", source, flags=re.MULTILINE)
    return {name: " ".join(part.strip(" #") for part in comment.splitlines()) for name, comment in found}


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def load_model_config(path: str | Path) -> ModelConfig:
    """Reads the `model:` section of a YAML preset (or a file that is only a model section)."""
    data = load_yaml(path)
    return build(ModelConfig, data.get("model", data), "model")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # file, directory or glob of the corpus; None means the default Shakespeare corpus
    format: str = "text"  # "text" (pretraining) or "chat" (JSONL conversations, loss on assistant turns only)
    tokenizer: str | None = None  # an existing tokenizer: tokenizer.model (SentencePiece or Meta's tiktoken),
    #                               tokenizer.json or a Hugging Face directory; None trains one on the corpus
    tokenizer_type: str = "bpe"  # "bpe" or "unigram", when training a tokenizer
    text_field: str = "text"  # the field holding the text in .jsonl files
    separator: str | None = None  # splits .txt files into documents; None means a file is a document
    utf8_errors: str = "strict"  # "strict" stops at invalid UTF-8 naming the byte offset; "replace" counts them
    val_fraction: float = 0.05  # share of documents held out for validation
    document_masking: bool = True  # packed documents do not attend to each other; positions restart per document
    cache_dir: str | None = None  # where prepared token files go; None means <run_dir>/data

    def __post_init__(self):
        for name, allowed in (("format", ("text", "chat")), ("tokenizer_type", ("bpe", "unigram")),
                              ("utf8_errors", ("strict", "replace"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per optimizer step (global, over all devices and micro-batches)
    seq_len: int = 256  # tokens per sequence (<= model.max_seq_len)
    grad_accum: int = 1  # micro-batches per step; batch_size must be divisible by it
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup from 0
    schedule: str = "cosine"  # "cosine", "constant" or "wsd" (warmup-stable-decay)
    decay_fraction: float = 0.2  # "wsd": the final share of steps that decays linearly
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # decoupled (AdamW), on weight matrices only, never on norms
    decay_embeddings: bool = False  # also decay the embedding matrix
    grad_clip: float = 1.0  # clip by global norm; 0 disables
    z_loss: float = 0.0  # weight of the mean squared log-normaliser (PaLM's z-loss); 0 disables
    loss_chunk: int = 4096  # tokens per chunk of the LM head + loss, bounding the logits held in memory
    eval_every: int = 100  # steps between validation passes (and one at the end)
    eval_batches: int = 8  # batches per validation pass
    eval_paths: tuple[str, ...] = ()  # text scored at each validation: name=path (a bare path: named by its stem)
    save_every: int = 200  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # the newest K checkpoints are kept
    log_every: int = 10  # steps between metrics.jsonl / TensorBoard rows
    seed: int = 0  # parameter init and data order
    mesh: str = ""  # device mesh, e.g. "data=2,fsdp=4,tensor=1"; empty means one device
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 measures a large matmul at start-up
    init_from: str | None = None  # start from these weights (a run or HF Llama directory, a GGUF or llama2.c file)

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_checkpoints",
                     "log_every", "eval_every", "save_every", "loss_chunk"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"grad_accum={self.grad_accum} does not divide batch_size={self.batch_size}")
        if self.schedule not in ("cosine", "constant", "wsd"):
            raise ConfigError(f"schedule={self.schedule!r} is not one of cosine, constant, wsd")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ConfigError("lr must be > 0, min_lr_ratio in [0, 1] and warmup_steps >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1={self.beta1}, beta2={self.beta2}: each must be in [0, 1)")


LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 0  # low-rank adapters of this rank on a frozen base (train.init_from); 0 trains every parameter
    alpha: float = 16.0  # the adapters' update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)
    targets: str = "wq,wk,wv,wo,w_gate,w_up,w_down"  # comma-separated projections that get an adapter
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(rank) (rsLoRA)

    def __post_init__(self):
        if self.rank < 0:
            raise ConfigError(f"rank={self.rank} must be >= 0 (0 turns LoRA off)")
        if not self.alpha > 0:
            raise ConfigError(f"alpha={self.alpha} must be > 0")
        names = self.target_names
        unknown = [t for t in names if t not in LORA_TARGETS]
        if unknown or not names or len(set(names)) != len(names):
            raise ConfigError(f"targets={self.targets!r}: expected distinct names among "
                              f"{', '.join(LORA_TARGETS)}" + (f" ({unknown[0]!r} is not one)" if unknown else ""))

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in str(self.targets).split(",") if t.strip())

    @property
    def scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "lora": LoraConfig}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    lora: LoraConfig = LoraConfig()

    def __post_init__(self):
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len="
                              f"{self.model.max_seq_len}")
        if self.lora.rank and not self.train.init_from:
            raise ConfigError(f"lora.rank={self.lora.rank} adapts a trained model: give it with --init-from (a run, a "
                              "Hugging Face directory or a GGUF file)")

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """A YAML file with model/data/train/lora sections (each optional), then `section.key=value` overrides."""
    raw = load_yaml(path) if path else {}
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown section {sorted(unknown)[0]!r} (known: {', '.join(SECTIONS)})")
    raw = apply_overrides(raw, list(overrides), tuple(SECTIONS))
    return RunConfig(**{name: build(cls, raw[name], name) for name, cls in SECTIONS.items()})


def dump_yaml(config: RunConfig, path: str | Path) -> None:
    """Writes the resolved config, replacing the file atomically (a kill mid-write never leaves half of one)."""
    from llama_jax.files import write_atomic

    write_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
