"""Training metrics: metrics.jsonl (one JSON object per row), TensorBoard event files, the loss-curve PNG, and the
throughput: tokens per second and MFU against a measured peak."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from llama_jax import model
from llama_jax.config import RunConfig
from llama_jax.matmul import matmul


class MetricsWriter:
    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in row.items()}}
        # Strict JSON: a non-finite value is written as null (json.dumps would write a bare NaN).
        strict = {k: v if math.isfinite(v) else None for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(strict, allow_nan=False) + "\n")
        for k, v in row.items():
            if k != "step":
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of metrics.jsonl; a line that is not JSON (one cut off by a kill mid-write) is skipped."""
    path = Path(path)
    rows = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def truncate_after(path: str | Path, step: int) -> None:
    """Drops rows past `step` (a resumed run rewrites what came after its checkpoint)."""
    rows = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = Path(path).with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def plot_loss(run_dir: str | Path) -> Path | None:
    """loss.png: train and validation loss against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = [(r["tokens_seen"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["tokens_seen"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def measure_peak_flops(dtype: str = "float32", n: int = 2048) -> float:
    """FLOP/s of a large square matmul on the default device: the denominator of MFU on machines without a
    published peak (CPUs). Best of a few runs."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: matmul(a, a, out_dtype=jnp.float32))  # the model's products (16-bit accumulate in f32)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class Throughput:
    """Tokens per second and model FLOPs utilisation over the steps since the last mark; time spent validating or
    saving is left out (restart)."""

    def __init__(self, config: RunConfig, step: int):
        tc = config.train
        self.tc, self.step, self.t = tc, step, None
        self.peak = tc.peak_flops or measure_peak_flops(config.model.dtype)
        self.flops_per_token = model.flops_per_token(config.model, tc.seq_len)

    def tick(self, step: int, metrics) -> dict | None:
        """The rates at log_every steps (waiting for the step to finish), else None."""
        tc = self.tc
        if self.t is None:  # the first step compiled and warmed up: start timing after it
            jax.block_until_ready(metrics)
            self.restart(step)
            return None
        if step % tc.log_every and step != tc.steps:
            return None
        jax.block_until_ready(metrics)
        rate = (step - self.step) * tc.batch_size * tc.seq_len / (time.perf_counter() - self.t)
        achieved = rate * self.flops_per_token / jax.device_count()
        # The start-up matmul (or a stated train.peak_flops) can fall short of what the machine does: on a shared CPU
        # it is timed under whatever load there was. A rate the run reaches is a peak it has shown, so the peak is
        # raised to it and MFU never reads above 100%.
        self.peak = max(self.peak, achieved)
        rates = {"tok_per_s": rate, "mfu": achieved / self.peak}
        self.restart(step)
        return rates

    def restart(self, step: int) -> None:
        self.step, self.t = step, time.perf_counter()

