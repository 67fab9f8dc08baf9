"""Model throughput: forward and forward+backward tokens/s of llama_jax against transformers.LlamaForCausalLM
(PyTorch eager and torch.compile), same config, batch and machine; and jit compile time of a 2-layer vs a
32-layer model (lax.scan over stacked layers keeps it flat).

    python benchmarks/bench_model.py [--preset stories15M] [--batch 8] [--seq 256] [--no-compile]
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
from benchmarks.common import add_malloc_flag, hf_model, load_ours_into_hf, machine, set_malloc, table, timeit  # noqa: E402
from llama_jax import optim
from llama_jax.config import TrainConfig  # noqa: E402
from llama_jax.train import step as T  # noqa: E402


def ours(config, params, tokens, targets):
    train = TrainConfig(seq_len=tokens.shape[1], batch_size=tokens.shape[0])
    batch = {"tokens": tokens, "targets": targets, "positions": None, "segment_ids": None,
             "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
    fwd = jax.jit(lambda p: T.loss_sums(p, batch, config, train)[0])
    bwd = jax.jit(jax.grad(lambda p: T.loss_sums(p, batch, config, train)[0]))
    return (timeit(lambda: fwd(params).block_until_ready(), 1, 5),
            timeit(lambda: jax.block_until_ready(bwd(params)), 1, 5))


def torch_ref(config, params, tokens, targets, compiled):
    import torch

    model = load_ours_into_hf(hf_model(config), config, params)
    x, y = torch.from_numpy(np.asarray(tokens)).long(), torch.from_numpy(np.asarray(targets)).long()

    def loss():
        logits = model(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    f = torch.compile(loss) if compiled else loss

    def fwd():
        with torch.no_grad():
            f()

    def bwd():
        f().backward()
        model.zero_grad(set_to_none=True)

    return timeit(fwd, 1, 5), timeit(bwd, 1, 5)


def compile_seconds(config) -> float:
    train = TrainConfig(seq_len=128, batch_size=2)
    state = jax.eval_shape(lambda: optim.init_state(config, train, jax.random.key(0)))
    b = {k: jax.ShapeDtypeStruct((2, 128), jnp.float32 if k == "loss_mask" else jnp.int32)
         for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
    step, _ = T.jit_steps(config, train)
    t = time.perf_counter()
    step.lower(state, b).compile()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="stories15M")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--no-compile", action="store_true")
    add_malloc_flag(p)
    args = p.parse_args()
    malloc = set_malloc(args)
    import torch

    print(f"machine: {machine()}; {malloc}; jax {jax.__version__}, torch {torch.__version__}")
    config = lj.load_model_config(Path(__file__).resolve().parents[1] / "configs" / f"{args.preset}.yaml")
    params = lj.init_params(config, jax.random.key(0))
    toks = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq + 1)),
                       jnp.int32)
    tokens, targets = toks[:, :-1], toks[:, 1:]
    n = args.batch * args.seq
    results = {"llama_jax (jit)": ours(config, params, tokens, targets),
               "PyTorch eager": torch_ref(config, params, tokens, targets, False)}
    if not args.no_compile:
        results["torch.compile"] = torch_ref(config, params, tokens, targets, True)
    ef, eb = results["PyTorch eager"]
    rows = [[name, f"{n / f:,.0f}", f"{ef / f:.2f}x", f"{n / b:,.0f}", f"{eb / b:.2f}x"]
            for name, (f, b) in results.items()]
    print(table(f"{args.preset}, batch {args.batch} x {args.seq}, float32: forward (loss) and forward+backward",
                ["implementation", "forward tok/s", "vs eager", "fwd+bwd tok/s", "vs eager"], rows))
    shallow = config.replace(n_layers=2)
    deep = config.replace(n_layers=32)
    # the preset's own choice aside (stories15M unrolls its 6 layers), both forms at both depths
    rows = [[f"{c.n_layers} layers", f"{compile_seconds(c.replace(scan_layers=True)):.1f}s",
             f"{compile_seconds(c.replace(scan_layers=False)):.1f}s"] for c in (shallow, deep)]
    print(table(f"Compile time of the train step ({args.preset} width)", ["depth", "lax.scan", "unrolled"], rows))


if __name__ == "__main__":
    main()
