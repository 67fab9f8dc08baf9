"""Orbax checkpoints of a training run: params, optimizer state, step and RNG as one pytree ("state"), plus JSON
("meta") holding the data iterator state, the resolved config and the tokenizer.

Orbax writes each step into a temporary directory and renames it when complete, so a crash or kill mid-save
leaves only the earlier steps visible. A step that is visible but still cannot be used (a damaged file, a deleted
part, non-finite parameters) is moved aside to `STEP.bad`, with one warning line, and the step before it is used:
the run can then save that step number again.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from llama_jax import optim
from llama_jax.config import ConfigError, ModelConfig, RunConfig, build, dump_yaml, load_run_config
from llama_jax.errors import UserError
from llama_jax.files import make_dirs
from llama_jax.text.tokenizer import tokenizer_from_files


class ResumeError(ValueError, UserError):
    """A checkpoint that cannot be resumed from; one line naming the directory and the problem."""


class SaveError(RuntimeError, UserError):
    """An asynchronous save that failed (disk full, permissions); one line naming the directory and the error."""


# Where the steps beyond keep_checkpoints go before they are deleted: Orbax renames a step into it in one step,
# so a kill in the middle of deleting one never leaves a half-deleted step listed among the checkpoints.
TRASH = "deleting"


def manager(directory: str | Path, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, todelete_subdir=TRASH,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=("state", "meta"))


def empty_trash(ckpt_dir: str | Path) -> None:
    """Deletes the steps that retention moved aside (see TRASH), and what a kill left of earlier ones. Only the
    run directory's writer calls it."""
    if jax.process_index() != 0:
        return
    trash = Path(ckpt_dir) / TRASH
    for old in (trash.iterdir() if trash.is_dir() else ()):
        shutil.rmtree(old, ignore_errors=True)


def save(mgr: ocp.CheckpointManager, step: int, state, meta: dict, where: str | Path | None = None) -> None:
    """Starts an (asynchronous) save; device buffers are copied before this returns, so `state` may be donated.
    `where` names the directory in messages as the user gave it."""
    try:
        mgr.wait_until_finished()  # as mgr.save would; then nothing renames into the trash while it is emptied
        empty_trash(mgr.directory)
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 force=True)
    except Exception as e:  # the previous asynchronous save failed (Orbax raises it here), or this one did
        raise _save_error(e, where or mgr.directory) from None


def finish_saving(mgr: ocp.CheckpointManager, where: str | Path, block: bool = True) -> None:
    """Raises SaveError if an asynchronous save has failed; with block=False only once it has ended."""
    if not block and mgr.is_saving_in_progress():
        return
    try:
        mgr.wait_until_finished()
    except Exception as e:
        raise _save_error(e, where) from None


def _save_error(error: Exception, where) -> SaveError:
    return SaveError(f"saving a checkpoint in {where} failed: {_short(error)}; the previous checkpoint is kept")


def close(mgr: ocp.CheckpointManager) -> None:
    """Closes a manager whose failure, if any, was already reported."""
    try:
        mgr.close()
    except Exception:
        pass
    empty_trash(mgr.directory)


def _short(error: Exception) -> str:
    """The operating system's words for a failed write ("No space left on device"), else the error's last line."""
    text = str(error)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        return os.strerror(int(code.group(1)))
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def tokenizer_meta(tok) -> dict:
    """How a checkpoint's meta carries the run's tokenizer: its files (tokenizer.model, or tokenizer.json with
    tokenizer_config.json and a chat template)."""
    return {"tokenizer_files": {name: encode_bytes(content) for name, content in tok.files.items()}}


def tokenizer_of(meta: dict, where: str | Path):
    """The tokenizer a checkpoint's meta carries (`where` names it in messages)."""
    if "tokenizer_files" in meta:
        files = {name: base64.b64decode(content) for name, content in meta["tokenizer_files"].items()}
    else:  # checkpoints written before tokenizer.json support carried a SentencePiece model alone
        files = {"tokenizer.model": base64.b64decode(meta["tokenizer"])}
    return tokenizer_from_files(files, where)


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
    return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def step_dirs(ckpt_dir: str | Path) -> list[int]:
    """Steps with a directory in `ckpt_dir` (complete or not; Orbax's temporary directories are not steps)."""
    d = Path(ckpt_dir)
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and p.is_dir()) if d.is_dir() else []


def restore(mgr: ocp.CheckpointManager, abstract_state, step: int | None = None, check=None,
            where: str | Path | None = None):
    """Restores (step, state, meta) from `step` or else the newest step that reads back and holds finite
    parameters; None if no step does. `abstract_state` gives the target shapes and shardings (ShapeDtypeStructs
    with .sharding), or is a function of the step's meta that returns them. `check(meta)` runs before the arrays
    are read, to refuse an incompatible config with a clear message. Unusable steps are moved aside
    (`STEP.bad`) unless `step` is given, which fails with one line instead. `where` names the directory in
    messages as the user gave it."""
    where = Path(where) if where is not None else Path(mgr.directory)
    steps = sorted(mgr.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise ResumeError(f"{where}: no checkpoint for step {step} (steps: {_listing(steps)})")
        steps = [step]
    for s in steps:
        try:
            meta = read_meta(mgr, s)
            if check is not None:
                check(meta)
            abstract = abstract_state(meta) if callable(abstract_state) else abstract_state
            state = mgr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
            if not _finite(state.params):
                raise _NonFinite("its parameters are not all finite")
            return s, state, meta
        except (ResumeError, ConfigError):
            raise
        except Exception as e:  # Orbax raises plain Exception, ValueError, KeyError, OSError... for a bad step
            reason = str(e) if isinstance(e, _NonFinite) else f"unreadable: {_short(e)}"
            if step is not None:
                raise ResumeError(f"{where}/{s}: {reason} (steps: {_listing(mgr.all_steps())})") from None
            moved = _move_aside(mgr, s)
            print(f"warning: checkpoint {where}/{s} is {reason}; "
                  f"{'moved it to ' + str(where / moved) + ', ' if moved else ''}using the previous one",
                  file=sys.stderr)
    return None


class _NonFinite(ValueError):
    pass


@jax.jit
def _all_finite(params):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _finite(params) -> bool:
    """Reduced where the arrays live: no host copy of the parameters, and a scalar every process can read even when
    the arrays are sharded over hosts (a host copy of those would fail, and be taken for damage)."""
    return bool(_all_finite(params))


def _listing(steps) -> str:
    return ", ".join(map(str, sorted(steps))) or "none"


def _move_aside(mgr: ocp.CheckpointManager, step: int) -> str | None:
    """Renames a bad step directory to STEP.bad (STEP.bad.1, ...) so that the step can be saved again."""
    if jax.process_index() != 0:
        return None
    src = Path(mgr.directory) / str(step)
    name, n = f"{step}.bad", 0
    while (src.parent / name).exists():
        n += 1
        name = f"{step}.bad.{n}"
    try:
        os.rename(src, src.parent / name)
    except OSError:
        return None
    mgr.reload()
    return name


def abstract_like(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


# What a resumed run keeps from its config.yaml whatever the flags say: its data, its tokenizer and what its
# batches are made of (the model's shape is checked against the checkpoint itself when it is restored).
FIXED_ON_RESUME = {"data": None, "train": ("batch_size", "seq_len", "seed", "init_from"), "lora": None}  # None: all


def resumed_config(run_dir: Path, overrides) -> RunConfig:
    """A resumed run's config: its config.yaml with the flags' overrides (a preset named again changes nothing by
    itself). A flag may change how long the run goes and how it reports (steps, schedule, evaluation, saving,
    logging); one that would change its data or tokenizer is refused, naming the key and both values."""
    saved_file = Path(run_dir) / "config.yaml"
    saved, config = load_run_config(saved_file), load_run_config(saved_file, overrides)
    for section, names in FIXED_ON_RESUME.items():
        before, now = getattr(saved, section), getattr(config, section)
        for name in names or [f.name for f in dataclasses.fields(before)]:
            if getattr(before, name) != getattr(now, name):
                raise ConfigError(f"cannot resume {run_dir}: {section}.{name} would change (saved "
                                  f"{getattr(before, name)!r}, now {getattr(now, name)!r}); a resumed run keeps its "
                                  "data and tokenizer: leave the flag out, or start a new --run-dir")
    return config


def run_config_of(meta: dict) -> RunConfig:
    """The run's config as its checkpoint recorded it."""
    saved = meta["config"]
    base = load_run_config(None, [])
    return dataclasses.replace(base, model=build(ModelConfig, saved["model"], "model"),
                               train=build(type(base.train), saved["train"], "train"),
                               lora=build(type(base.lora), saved.get("lora", {}), "lora"))


def load_run_params(run_dir, step: int | None = None):
    """(ModelConfig, params, meta) from a run directory's newest readable (or given) checkpoint, onto the default
    device. Damaged newer steps are moved aside with a warning; none readable is a ResumeError. A LoRA run's
    params are its adapters (meta["lora_base"] records the base: load.load_checkpoint merges them)."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if not step_dirs(ckpt_dir):
        raise ResumeError(f"{run_dir}: no checkpoint in {ckpt_dir}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def abstract(meta):
        config = run_config_of(meta)
        shapes = jax.eval_shape(lambda: optim.init_state(config.model, config.train, jax.random.key(0),
                                                          lora=config.lora))
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)

    mgr = manager(ckpt_dir, async_save=False)
    try:
        got = restore(mgr, abstract, step, where=ckpt_dir)
    finally:
        close(mgr)
    if got is None:
        raise ResumeError(f"{run_dir}: no readable checkpoint in {ckpt_dir}")
    step, state, meta = got
    return run_config_of(meta).model, state.params, meta | {"step": step}


def save_imported(run_dir, model_config: ModelConfig, params, tok, loader_state: dict) -> Path:
    """Writes weights from elsewhere (e.g. Hugging Face) as step 0 of a new run directory, with a fresh optimizer
    state, so that generate.py, train.py --init-from and --resume can use it."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir} exists and is not empty; choose a new directory")
    base = load_run_config(None, [f"train.seq_len={min(256, model_config.max_seq_len)}"])
    config = dataclasses.replace(base, model=model_config)
    make_dirs(run_dir, "--out")
    tok.save(run_dir)
    dump_yaml(config, run_dir / "config.yaml")
    state = optim.init_state(model_config, config.train, jax.random.key(0), params)
    mgr = manager(run_dir / "checkpoints", async_save=False)
    meta = {"step": 0, "loader": loader_state, "config": config.to_dict(), **tokenizer_meta(tok)}
    save(mgr, 0, state, meta)
    mgr.wait_until_finished()
    mgr.close()
    return run_dir
