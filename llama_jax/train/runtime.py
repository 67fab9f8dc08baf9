"""What surrounds a training process: stop signals, one writer per run directory, and several processes that
prepare, stop and fail together. No training here; loop.py calls these."""

from __future__ import annotations

import fcntl
import os
import signal
import sys
from pathlib import Path

import jax
import numpy as np

from llama_jax.config import ConfigError


class Interrupted(RuntimeError):
    """A stop signal during start-up, before there is anything to save; exits 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Signals:
    """SIGINT/SIGTERM. During start-up: recorded, and the run stops with one line at the end of the start-up phase
    it is in (`check`; nothing to save yet). During training: the loop finishes its step, saves and exits 0.
    Further signals while that save runs are reported and ignored, so the stop checkpoint is never lost to an
    impatient second Ctrl-C (SIGKILL still stops at once; the previous checkpoint then stays the one to resume
    from). The handler never raises: an exception thrown while XLA's C++ code is on the stack (compiling, a
    tokenizer's native loop) aborts the whole process."""

    def __init__(self):
        self.signal = None
        self.training = False
        self.startup_signal = None  # a signal received during start-up (its number)
        self._old = {}
        try:
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: leave signals alone
            pass

    def check(self) -> None:
        """Raises Interrupted if a stop signal came during start-up: called between the start-up phases."""
        if self.startup_signal is not None and not self.training:
            name = signal.Signals(self.startup_signal).name
            raise Interrupted(f"stopped by {name} during start-up, before the first step; nothing was saved",
                              self.startup_signal)

    def begin_training(self) -> None:
        """From here a signal finishes the current step and saves (a start-up signal not yet checked stops the run
        after its first step)."""
        self.check()
        self.training = True
        if self.startup_signal is not None and self.signal is None:
            self.signal = signal.Signals(self.startup_signal).name

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.training:
            if self.startup_signal is None:
                print(f"\n{name}: stopping at the end of this start-up phase", file=sys.stderr, flush=True)
            self.startup_signal = signum
            return
        if self.signal is None:
            self.signal = name
            print(f"\n{name}: finishing this step, then saving a checkpoint and stopping", file=sys.stderr)
        else:
            print(f"\n{name} again: still stopping; waiting for the checkpoint to be written", file=sys.stderr)

    def take(self, signum: int) -> None:
        """Handles signum again (after a library replaced the handler)."""
        if signum in self._old:
            signal.signal(signum, self._handle)

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


class RunLock:
    """One writer per run directory: an exclusive flock on RUN_DIR/train.lock, released by the kernel on any exit
    (a crash or SIGKILL included, so a lock is never stale)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "train.lock"
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            pid = self.file.read().strip() or "?"
            self.file.close()
            raise ConfigError(f"{run_dir} is in use by another train.py (pid {pid}); wait for it to finish or "
                              "choose another --run-dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def start_distributed(args) -> None:
    """jax.distributed.initialize from train.py's flags, with one-line errors."""
    try:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                   initialization_timeout=args.distributed_timeout,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout,
                                   shutdown_timeout_seconds=args.distributed_timeout)
    except Exception as e:  # bad address, coordinator unreachable, timeout: one line, not the C++ status dump
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"--coordinator {args.coordinator}: could not connect the {args.num_processes} processes "
                          f"({first})") from None


def end_distributed(signals: Signals) -> None:
    """Stops JAX's preemption notifier, gives SIGTERM back to `signals` and leaves the processes' group together.
    Shutting the notifier down resets SIGTERM to its default, so a preemption notice that reaches this process
    after the others have stopped (the stop checkpoint written, waiting for them at the shutdown barrier) would
    kill it without a word; JAX's own shutdown at exit does exactly that."""
    from jax._src import distributed  # the notifier alone has no public switch

    state = distributed.global_state
    manager = getattr(state, "preemption_sync_manager", None)
    if manager is not None:
        manager.shutdown()
        state.preemption_sync_manager = None
    signals.take(signal.SIGTERM)
    jax.distributed.shutdown()


def on_process_zero(fn):
    """Runs fn() on process 0 while the other processes wait; they then run it too (so each gets its own handles
    to what process 0 wrote). A failure on process 0 stops every process with one line."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    error = None
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as e:  # reported to the others first, then raised here as it is
            error = e
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
        raise error
    if not ok:
        raise ConfigError("process 0 could not prepare the run (its output says why)")
    return result if jax.process_index() == 0 else fn()


def stop_requested(signals: Signals, step: int) -> str | None:
    """The signal that stops the run after `step`, if any; called after every step. With several processes they
    agree on it every step (a signal may reach them seconds apart), so all of them save the same step and stop
    together. `jax.distributed.initialize` hands SIGTERM to JAX's preemption notifier (our handler never sees it
    there): its sync point tells every process, at the same step, that one of them was told to stop."""
    if jax.process_count() == 1:
        return signals.signal
    from jax.experimental import multihost_utils

    try:  # every process must call it at every step, or the agreed step never comes
        preempted = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is turned off (jax_enable_preemption_service)
        preempted = False
    mine = np.int32(0 if signals.signal is None else 1)
    if not (np.any(multihost_utils.process_allgather(mine)) or preempted):
        return None
    if preempted:
        return signals.signal or "SIGTERM (a preemption notice to one of the processes)"
    return signals.signal or "a signal to another process"
