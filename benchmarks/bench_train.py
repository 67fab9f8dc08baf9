"""Full training step (forward, backward, AdamW update) tokens/s and MFU: llama_jax against
transformers.LlamaForCausalLM + torch.optim.AdamW (eager and torch.compile), same shapes, same machine, one run.

    python benchmarks/bench_train.py [--presets stories15M stories110M] [--repeat 5] [--no-compile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import llama_jax as lj  # noqa: E402
from benchmarks.common import add_malloc_flag, machine, set_malloc, table, timeit, torch_train_step  # noqa: E402
from llama_jax import optim
from llama_jax.config import TrainConfig  # noqa: E402
from llama_jax.train import step as T  # noqa: E402
from llama_jax.train.metrics import measure_peak_flops

SHAPES = {"stories15M": (8, 256), "stories110M": (4, 512)}


def ours(config, batch, seq, repeat):
    train = TrainConfig(batch_size=batch, seq_len=seq, warmup_steps=0, steps=1000)
    state = optim.init_state(config, train, jax.random.key(0))
    rng = np.random.default_rng(0)
    toks = rng.integers(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
    b = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "positions": np.tile(np.arange(seq, dtype=np.int32),
         (batch, 1)), "segment_ids": np.ones((batch, seq), np.int32), "loss_mask": np.ones((batch, seq), np.float32)}
    b = jax.tree.map(jnp.asarray, b)
    step, _ = T.jit_steps(config, train)
    t0 = time.perf_counter()
    step = step.lower(state, b).compile()
    compile_s = time.perf_counter() - t0
    holder = [state]

    def run():
        holder[0], m = step(holder[0], b)
        jax.block_until_ready(m)

    return timeit(run, warmup=2, repeat=repeat), compile_s


def torch_step(config, batch, seq, repeat, compiled, bf16=False):
    run = torch_train_step(config, batch, seq, bf16=bf16, compiled=compiled)
    t0 = time.perf_counter()
    run()  # for torch.compile, the first call compiles
    compile_s = time.perf_counter() - t0
    return timeit(run, warmup=1, repeat=repeat), compile_s


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=list(SHAPES))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build)")
    p.add_argument("--bf16", action="store_true", help="also bfloat16 compute (ours) vs torch.autocast bf16")
    add_malloc_flag(p)
    args = p.parse_args()
    malloc = set_malloc(args)
    import torch

    peaks = {dtype: measure_peak_flops(dtype) for dtype in ("float32", "bfloat16")}
    print(f"machine: {machine()}; {malloc}; jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); measured matmul peak: float32 {peaks['float32'] / 1e9:.0f} "
          f"GFLOP/s, bfloat16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s")
    rows = []
    for preset in args.presets:
        config = lj.load_model_config(Path(__file__).resolve().parents[1] / "configs" / f"{preset}.yaml")
        batch, seq = SHAPES.get(preset, (4, 256))
        tokens = batch * seq
        flops = lj.flops_per_token(config, seq) * tokens
        results = {}  # name -> (seconds, compile seconds, the PyTorch eager row of the same precision)
        for bf16 in (False, True) if args.bf16 else (False,):
            tag, cfg = (" bf16", config.replace(dtype="bfloat16")) if bf16 else ("", config)
            eager = "PyTorch eager" + (" bf16 autocast" if bf16 else "")
            results[f"llama_jax{tag} (scan layers)"] = ours(cfg.replace(scan_layers=True), batch, seq,
                                                            args.repeat) + (eager,)
            results[f"llama_jax{tag} (unrolled layers)"] = ours(cfg.replace(scan_layers=False), batch, seq,
                                                                args.repeat) + (eager,)
            results[eager] = torch_step(config, batch, seq, args.repeat, False, bf16) + (eager,)
            if not args.no_compile:
                results["torch.compile" + (" bf16 autocast" if bf16 else "")] = torch_step(
                    config, batch, seq, args.repeat, True, bf16) + (eager,)
        for name, (sec, comp, eager) in results.items():
            peak = peaks["bfloat16" if "bf16" in name else "float32"]
            rows.append([preset, f"{batch}x{seq}", name, f"{tokens / sec:,.0f}", f"{100 * flops / sec / peak:.1f}%",
                         f"{results[eager][0] / sec:.2f}x", f"{comp:.1f}s"])
        print(rows[-len(results):], flush=True)
    print(table("Training step: forward + backward + AdamW (float32 unless marked bf16; MFU against the measured "
                "matmul peak of that precision; 'vs eager' against PyTorch eager of the same precision)",
                ["preset", "batch", "implementation", "tokens/s", "MFU", "vs eager", "compile / first step"], rows))


if __name__ == "__main__":
    main()
