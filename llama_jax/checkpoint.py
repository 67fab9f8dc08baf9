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


def read_meta(mgr: ocp.CheckpointManager, step: int) -> dict:
    return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore(mgr: ocp.CheckpointManager, abstract_state, step: int | None = None, check=None):
    """Restores (step, state, meta) onto the shardings in `abstract_state` (ShapeDtypeStructs with .sharding),
    from `step` or the newest step that reads back; None if there is no checkpoint. `check(meta)` runs before
    the arrays are read (to refuse an incompatible config with a clear message)."""
    steps = sorted(mgr.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise ResumeError(f"{mgr.directory}: no checkpoint for step {step} (have {sorted(steps) or 'none'})")
        steps = [step]
    for s in steps:
        try:
            meta = read_meta(mgr, s)
        except (ValueError, FileNotFoundError, OSError, KeyError) as e:
            _unreadable(mgr, s, e, fatal=step is not None)
            continue
        if check is not None:
            check(meta)
        try:
            state = mgr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))).state
            return s, state, meta
        except (ValueError, FileNotFoundError, OSError, KeyError) as e:
            _unreadable(mgr, s, e, fatal=step is not None)
    return None


def _unreadable(mgr, step: int, error: Exception, fatal: bool) -> None:
    if fatal:
        raise ResumeError(f"{mgr.directory}/{step}: unreadable checkpoint ({type(error).__name__})") from None
    print(f"warning: checkpoint {mgr.directory}/{step} is unreadable ({type(error).__name__}); "
          "trying the previous one", file=sys.stderr)


def abstract_like(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
