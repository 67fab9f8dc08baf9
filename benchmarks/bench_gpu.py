"""On a GPU: training-step MFU of the ~1B preset (bfloat16, cuDNN attention) and decode speed against the HBM
bandwidth floor, side by side with transformers + PyTorch on the same GPU, same shapes, one run.

    python benchmarks/bench_gpu.py [--preset llama3.2-1b] [--batch 8] [--seq 2048] [--no-compile]

Each measurement runs in its own process, so that JAX's and PyTorch's allocators never share the card; the
driver collects one JSON line from each and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import table, timeit  # noqa: E402
from llama_jax import optim  # noqa: E402


def _config(args, **changes):
    import llama_jax as lj

    return lj.load_model_config(ROOT / "configs" / f"{args.preset}.yaml").replace(**changes)


def _batch(config, batch, seq, packed, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    toks = rng.integers(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
    positions = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
    segments = np.ones((batch, seq), np.int32)
    if packed:  # two documents per row: positions restart and attention stops at the boundary
        positions[:, seq // 2:] -= seq // 2
        segments[:, seq // 2:] = 2
    return {"tokens": toks[:, :-1], "targets": toks[:, 1:], "positions": positions, "segment_ids": segments,
            "loss_mask": np.ones((batch, seq), np.float32)}


def part_ceilings(args):
    """The two ceilings every ratio below is taken against, measured here: bf16 matmul rate and read bandwidth."""
    import jax
    import jax.numpy as jnp

    n = 8192
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
    mm = jax.jit(lambda a, b: a @ b)
    t_mm = timeit(lambda: mm(a, b).block_until_ready(), warmup=3, repeat=20)
    x = jax.random.normal(jax.random.key(3), (1 << 30,), jnp.bfloat16)  # 2 GiB, far beyond L2
    total = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    t_read = timeit(lambda: total(x).block_until_ready(), warmup=3, repeat=20)
    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "bf16_flops": 2 * n**3 / t_mm,
            "read_bw": x.nbytes / t_read}


def part_torch_peak(args):
    """PyTorch's bf16 matmul rate on the same card: the peer's view of the ceiling."""
    import torch

    n = 8192
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(2))

    def run():
        a @ b
        torch.cuda.synchronize()

    return {"bf16_flops": 2 * n**3 / timeit(run, warmup=3, repeat=20)}


def part_ours_train(args):
    import jax
    import jax.numpy as jnp

    import llama_jax as lj
    from llama_jax.config import TrainConfig
    from llama_jax.train import step as T

    config = _config(args, dtype="bfloat16", attention_impl=args.attention, remat=args.remat)
    train = TrainConfig(batch_size=args.batch, seq_len=args.seq, warmup_steps=0, steps=1000,
                        loss_chunk=args.loss_chunk)
    state = optim.init_state(config, train, jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, _batch(config, args.batch, args.seq, args.packed))
    if not args.packed:
        batch.pop("segment_ids")  # plain causal attention: the kernel's own causal masking
    step, _ = T.jit_steps(config, train)
    t0 = time.perf_counter()
    step = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    holder = [state, None]

    def run():
        holder[0], holder[1] = step(holder[0], batch)
        jax.block_until_ready(holder[1])

    sec = timeit(run, warmup=2, repeat=args.repeat)
    peak_mem = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
    return {"sec": sec, "compile": compile_s, "loss": float(holder[1]["loss"]), "mem": peak_mem,
            "flops": lj.flops_per_token(config, args.seq) * args.batch * args.seq}


def part_torch_train(args):
    import torch

    from benchmarks.common import torch_train_step

    run = torch_train_step(_config(args), args.batch, args.seq, device="cuda", bf16=True, compiled=args.compile)
    t0 = time.perf_counter()
    loss = run()  # for torch.compile, the first call compiles
    compile_s = time.perf_counter() - t0
    sec = timeit(run, warmup=1, repeat=args.repeat)
    return {"sec": sec, "compile": compile_s, "loss": loss, "mem": torch.cuda.max_memory_allocated()}


def part_ours_decode(args):
    import jax
    import jax.numpy as jnp

    import llama_jax as lj
    from llama_jax import decode, model

    config = _config(args, dtype="bfloat16")
    params = model.unstack_layers(lj.init_params(config, jax.random.key(0)), config.dtype)  # what generate does
    tokens = jnp.ones((args.batch, args.prompt_len), jnp.int32)
    lengths = jnp.full((args.batch,), args.prompt_len, jnp.int32)
    max_len = args.prompt_len + args.new_tokens
    sampler = decode.Sampler(temperature=0.0)
    run = lambda n: decode._generate_jit(params, tokens, lengths, jax.random.key(0), config, sampler, max_len,
                                         n).block_until_ready()
    t_full = timeit(lambda: run(args.new_tokens), warmup=1, repeat=5)
    t_one = timeit(lambda: run(1), warmup=1, repeat=5)
    weight_bytes = sum(x.nbytes for k, x in params.items() if k != "embed" for x in jax.tree.leaves(x))
    return {"prefill": t_one, "step": (t_full - t_one) / (args.new_tokens - 1), "weight_bytes": weight_bytes}


def part_hf_decode(args):
    import torch

    from benchmarks.common import hf_model

    config = _config(args)
    model = hf_model(config).to(device="cuda", dtype=torch.bfloat16).eval()
    ids = torch.ones((args.batch, args.prompt_len), dtype=torch.long, device="cuda")
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def gen(n):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()

    t_full = timeit(lambda: gen(args.new_tokens), warmup=1, repeat=3)
    t_one = timeit(lambda: gen(1), warmup=1, repeat=3)
    return {"prefill": t_one, "step": (t_full - t_one) / (args.new_tokens - 1)}


def part_check(args):
    """The cuDNN path computes the same loss as the plain-XLA reference on this GPU (bf16 tolerance)."""
    import jax
    import jax.numpy as jnp

    import llama_jax as lj
    from llama_jax.config import TrainConfig
    from llama_jax.train import step as T

    out = {}
    for packed in (False, True):
        batch = jax.tree.map(jnp.asarray, _batch(_config(args), 2, 1024, packed, seed=1))
        if not packed:
            batch.pop("segment_ids")
        losses = {}
        for impl in ("reference", "cudnn"):
            config = _config(args, dtype="bfloat16", attention_impl=impl, n_layers=2)
            params = lj.init_params(config, jax.random.key(1))
            train = TrainConfig(batch_size=2, seq_len=1024)
            _, (ce, _, n) = jax.jit(T.loss_sums, static_argnums=(2, 3))(params, batch, config, train)
            losses[impl] = float(ce / n)
        out["packed" if packed else "causal"] = losses
    return out


PARTS = {"ceilings": part_ceilings, "torch-peak": part_torch_peak, "ours-train": part_ours_train,
         "torch-train": part_torch_train, "ours-decode": part_ours_decode, "hf-decode": part_hf_decode,
         "check": part_check}


def _run(args, part, *extra):
    cmd = [sys.executable, __file__, "--part", part, "--preset", args.preset, "--batch", str(args.batch), "--seq",
           str(args.seq), "--repeat", str(args.repeat), "--prompt-len", str(args.prompt_len), "--new-tokens",
           str(args.new_tokens), "--loss-chunk", str(args.loss_chunk), *extra]
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"{part} {' '.join(extra)}: failed: {tail}", flush=True)
        return None
    result = json.loads(lines[-1])
    print(f"{part} {' '.join(extra)}: {result}", flush=True)
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=list(PARTS))
    p.add_argument("--preset", default="llama3.2-1b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--remat", default="none")
    p.add_argument("--attention", default="cudnn")
    p.add_argument("--packed", action="store_true")
    p.add_argument("--loss-chunk", type=int, default=16384, help="as configs/llama3.2-1b.yaml")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="driver: skip torch.compile")
    p.add_argument("--sections", nargs="+", default=["train", "decode"], choices=["train", "decode"])
    args = p.parse_args()
    if args.part:
        print(json.dumps(PARTS[args.part](args)), flush=True)
        return

    ceil = _run(args, "ceilings")
    torch_peak = (_run(args, "torch-peak") or {}).get("bf16_flops", 0)
    print(f"check: {_run(args, 'check')}")
    peak, bw = max(ceil["bf16_flops"], torch_peak), ceil["read_bw"]
    rows = []
    variants = [] if "train" not in args.sections else [
        ("llama_jax (preset: cuDNN, remat save_matmuls)", "ours-train", ["--remat", "save_matmuls"]),
        ("llama_jax, remat none", "ours-train", ["--remat", "none"]),
        ("llama_jax, packed documents (dense mask)", "ours-train", ["--remat", "save_matmuls", "--packed"]),
        ("PyTorch eager (autocast bf16, SDPA)", "torch-train", [])]
    if variants and not args.no_compile:
        variants.append(("torch.compile (autocast bf16, SDPA)", "torch-train", ["--compile"]))
    tokens = args.batch * args.seq
    flops = None
    for name, part, extra in variants:
        r = _run(args, part, *extra)
        if r is None:
            rows.append([name, "failed", "", "", "", ""])
            continue
        flops = r.get("flops", flops)
        rows.append([name, f"{tokens / r['sec']:,.0f}", f"{100 * flops / r['sec'] / 989e12:.1f}%",
                     f"{100 * flops / r['sec'] / peak:.1f}%", f"{r['mem'] / 2**30:.1f}", f"{r['compile']:.1f}s"])
    if rows:
        print(table(f"Training step, {args.preset}, batch {args.batch}x{args.seq}, bfloat16 compute, float32 master "
                    f"weights + AdamW ({ceil['device']}; bf16 matmul 8192^3 measured: JAX "
                    f"{ceil['bf16_flops'] / 1e12:.0f}, PyTorch {torch_peak / 1e12:.0f} TFLOP/s)",
                    ["implementation", "tokens/s", "MFU (989 TFLOP/s datasheet)", "MFU (best measured)", "peak GiB",
                     "compile / first step"], rows))
    rows, wb = [], 0
    for batch in (1, 8) if "decode" in args.sections else ():
        for name, part in (("llama_jax", "ours-decode"), ("transformers generate", "hf-decode")):
            args_b = argparse.Namespace(**{**vars(args), "batch": batch})
            r = _run(args_b, part)
            if r is None:
                rows.append([name, batch, "failed", "", "", ""])
                continue
            wb = r.get("weight_bytes", wb)  # ours runs first; transformers reads the same bf16 weights
            rows.append([name, batch, f"{batch * args.prompt_len / r['prefill']:,.0f}", f"{batch / r['step']:,.1f}",
                         f"{1000 * r['step']:.2f}", f"{100 * wb / bw / r['step']:.0f}%" if wb else ""])
    if rows:
        print(table(f"Generation, {args.preset}, bfloat16 weights, prompt {args.prompt_len}, {args.new_tokens} new, "
                    f"greedy (measured read bandwidth {bw / 1e12:.2f} TB/s)",
                    ["implementation", "batch", "prefill tok/s", "decode tok/s", "ms/step",
                     "weights read per step / bandwidth floor"], rows))


if __name__ == "__main__":
    main()
