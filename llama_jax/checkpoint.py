"""Orbax checkpoints of a training run: params, optimizer state, step and RNG as one pytree ("state"), plus JSON
("meta") holding the data iterator state, the resolved config and the tokenizer.

Orbax writes each step into a temporary directory and renames it when complete, so a crash or kill mid-save
leaves only the earlier steps visible; a step that still fails to restore is skipped for the one before it.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed from; one line naming the directory and the problem."""


def manager(directory: str | Path, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=("state", "meta"))


def save(mgr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    """Starts an (asynchronous) save; device buffers are copied before this returns, so `state` may be donated."""
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
             force=True)


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_bytes(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
    return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore(mgr: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restores (step, state, meta) onto the shardings in `abstract_state` (ShapeDtypeStructs with .sharding),
    from `step` or the newest step that reads back; None if there is no checkpoint."""
    steps = sorted(mgr.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise ResumeError(f"{mgr.directory}: no checkpoint for step {step} (have {sorted(steps) or 'none'})")
        steps = [step]
    for s in steps:
        try:
            restored = mgr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                              meta=ocp.args.JsonRestore()))
            return s, restored.state, restored.meta
        except (ValueError, FileNotFoundError, OSError, KeyError) as e:
            if step is not None:
                raise ResumeError(f"{mgr.directory}/{s}: unreadable checkpoint ({type(e).__name__})") from None
            print(f"warning: checkpoint {mgr.directory}/{s} is unreadable ({type(e).__name__}); "
                  "trying the previous one", file=sys.stderr)
    return None


def abstract_like(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def latest_params(run_dir: str | Path, step: int | None = None):
    """(ModelConfig, params, meta) of a run directory's newest (or given) checkpoint, on the default device,
    without rebuilding the optimizer: used by sampling and export."""
    from llama_jax.config import ModelConfig, build

    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ResumeError(f"{run_dir}: no checkpoints/ directory (expected a training run directory)")
    mgr = manager(ckpt_dir, async_save=False)
    steps = sorted(mgr.all_steps(), reverse=True)
    if not steps:
        raise ResumeError(f"{ckpt_dir}: no complete checkpoint")
    if step is not None and step not in steps:
        raise ResumeError(f"{ckpt_dir}: no checkpoint for step {step} (have {sorted(steps)})")
    step = steps[0] if step is None else step
    meta = read_meta(mgr, step)
    config = build(ModelConfig, meta["config"]["model"], "model")
    restored = mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=None, partial_restore=True, item={"params": _params_target(config)})))
    mgr.close()
    return config, restored.state["params"], meta | {"step": step}


def _params_target(config):
    from llama_jax.model import init_params

    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
