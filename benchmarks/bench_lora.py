"""A LoRA training step: tokens/s and peak resident memory of llama_jax's LoRA step, against our full fine-tuning
step and PEFT on PyTorch (eager) with the same rank, targets, batch and sequence length. Each row runs in its own
process, so that its peak memory is its own.

    python benchmarks/bench_lora.py [--shapes smollm2-135m stories110M] [--batch 4] [--seq 256] [--rank 8] [--bf16]

--bf16: our model in bfloat16 (the frozen base held in bfloat16, the adapters and optimizer state float32),
PyTorch under torch.autocast(bfloat16) - what a CPU with AMX runs fastest.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
TARGETS = "wq,wk,wv,wo,w_gate,w_up,w_down"
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_config(shape: str, bf16: bool = False):
    from llama_jax.config import ModelConfig, load_model_config

    if shape == "smollm2-135m":  # SmolLM2-135M's shape (the GGUF of the README's example)
        config = ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                             max_seq_len=2048, rope_theta=100000.0, tie_embeddings=True)
    else:
        config = load_model_config(ROOT / "configs" / f"{shape}.yaml")
    # unrolled, as the presets train: XLA:CPU ran this LoRA step 2.5x faster so in bfloat16 (1.09x in float32)
    return config.replace(dtype="bfloat16" if bf16 else "float32", scan_layers=False)


def _batch(config, batch, seq):
    import numpy as np

    toks = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
    return toks[:, :-1], toks[:, 1:]


def row_ours(shape, batch, seq, rank, repeat, adapted, bf16=False):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.common import timeit
    from llama_jax import lora, model, optim
    from llama_jax.config import LoraConfig, TrainConfig
    from llama_jax.train import step as T

    config = model_config(shape, bf16)
    train = TrainConfig(batch_size=batch, seq_len=seq, warmup_steps=0, steps=1000)
    params = model.init_params(config, jax.random.key(0))
    x, y = _batch(config, batch, seq)
    b = jax.tree.map(jnp.asarray, {"tokens": x, "targets": y, "positions": np.tile(np.arange(seq, dtype=np.int32),
                                   (batch, 1)), "loss_mask": np.ones((batch, seq), np.float32)})
    if adapted:
        lc = LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS)
        state = optim.init_state(config, train, jax.random.key(0), lora.init_adapters(config, lc, jax.random.key(1)))
        base = jax.tree.map(lambda w: w.astype(config.dtype), params)  # as train.py holds a LoRA run's base
        del params
        step, extra = T.jit_steps(config, train, lora=lc)[0], (base,)
    else:
        state = optim.init_state(config, train, jax.random.key(0), params)
        del params
        step, extra = T.jit_steps(config, train)[0], ()
    holder = [state]

    def run():
        holder[0], m = step(holder[0], b, *extra)
        jax.block_until_ready(m)

    return timeit(run, warmup=2, repeat=repeat)


def row_peft(shape, batch, seq, rank, repeat, bf16=False):
    import peft
    import torch

    from benchmarks.common import hf_model, timeit

    config = model_config(shape)
    torch.manual_seed(0)
    model = peft.get_peft_model(hf_model(config).train(), peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=PEFT_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x, y = (torch.from_numpy(a).long() for a in _batch(config, batch, seq))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return timeit(run, warmup=2, repeat=repeat)


def one_row(args) -> None:
    t0 = time.perf_counter()
    if args.row == "peft":
        sec = row_peft(args.shape, args.batch, args.seq, args.rank, args.repeat, args.bf16)
    else:
        sec = row_ours(args.shape, args.batch, args.seq, args.rank, args.repeat, args.row == "lora", args.bf16)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    print(json.dumps({"step_s": sec, "tok_s": args.batch * args.seq / sec, "peak_mb": rss,
                      "total_s": time.perf_counter() - t0}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["smollm2-135m", "stories110M"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--row", choices=["lora", "full", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:
        return one_row(args)
    from benchmarks.common import machine, table

    dtype = "bfloat16" if args.bf16 else "float32"
    print(f"# LoRA training step, {dtype}, batch {args.batch} x {args.seq}, rank {args.rank} on all seven "
          f"projections; {machine()}")
    rows = []
    for shape in args.shapes:
        got = {}
        for row in ("lora", "full", "peft"):
            out = subprocess.run([sys.executable, __file__, "--row", row, "--shape", shape, "--batch", str(args.batch),
                                  "--seq", str(args.seq), "--rank", str(args.rank), "--repeat", str(args.repeat),
                                  *(["--bf16"] if args.bf16 else [])],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f"{row} on {shape} failed:\n{out.stderr[-3000:]}")
            got[row] = json.loads(out.stdout.strip().splitlines()[-1])
        lo, full, pf = got["lora"], got["full"], got["peft"]
        rows.append([shape, f"{lo['tok_s']:,.0f}", f"{full['tok_s']:,.0f}", f"{pf['tok_s']:,.0f}",
                     f"{lo['tok_s'] / pf['tok_s']:.2f}x", f"{lo['peak_mb']:,.0f}", f"{full['peak_mb']:,.0f}",
                     f"{pf['peak_mb']:,.0f}", f"{lo['peak_mb'] / full['peak_mb']:.0%}"])
        print(rows[-1], flush=True)
    print(table("LoRA step vs our full fine-tune vs PEFT (PyTorch eager)",
                ["shape", "LoRA tok/s", "full FT tok/s", "PEFT tok/s", "LoRA / PEFT", "LoRA peak MB",
                 "full FT peak MB", "PEFT peak MB", "LoRA / full FT memory"], rows))


if __name__ == "__main__":
    main()
