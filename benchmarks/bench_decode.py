"""Generation speed: prefill tokens/s and decode tokens/s at batch 1 and 8, llama_jax against
transformers.LlamaForCausalLM.generate (PyTorch, CPU, same weights, greedy), plus the memory-bandwidth floor.

    python benchmarks/bench_decode.py [--presets stories15M stories110M] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import llama_jax as lj  # noqa: E402
from benchmarks.common import add_malloc_flag, hf_model, load_ours_into_hf, machine, set_malloc, table, timeit  # noqa: E402
from llama_jax import decode, model  # noqa: E402


def read_bandwidth() -> float:
    """Bytes/s of a reduction over a 1 GiB float32 array (each byte read once)."""
    x = jnp.ones((1 << 28,), jnp.float32)
    f = jax.jit(jnp.sum)
    return x.nbytes / timeit(lambda: f(x).block_until_ready(), warmup=1, repeat=5)


def ours_generate(params, config, batch, prompt_len, new):
    tokens = jnp.ones((batch, -(-prompt_len // 16) * 16), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    max_len = -(-(tokens.shape[1] + new) // 64) * 64
    sampler = decode.Sampler(temperature=0.0)
    params = model.unstack_layers(params, config.dtype)  # what lj.generate does before its jitted loop
    run = lambda n: decode._generate_jit(params, tokens, lengths, jax.random.key(0), config, sampler, max_len,
                                         n).block_until_ready()
    t_full = timeit(lambda: run(new), warmup=1, repeat=3)
    t_one = timeit(lambda: run(1), warmup=1, repeat=3)  # prefill + first token
    return t_one, (t_full - t_one) / (new - 1)


def hf_generate(model, batch, prompt_len, new):
    import torch

    ids = torch.ones((batch, prompt_len), dtype=torch.long)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        t_full = timeit(lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw), 1, 3)
        t_one = timeit(lambda: model.generate(ids, max_new_tokens=1, **kw), 1, 3)
    return t_one, (t_full - t_one) / (new - 1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", nargs="+", default=["stories15M", "stories110M"])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    add_malloc_flag(p)
    args = p.parse_args()
    malloc = set_malloc(args)
    import torch

    bw = read_bandwidth()
    print(f"machine: {machine()}; {malloc}; jax {jax.__version__}, torch {torch.__version__}; measured read bandwidth "
          f"{bw / 1e9:.1f} GB/s")
    rows = []
    for preset in args.presets:
        config = lj.load_model_config(Path(__file__).resolve().parents[1] / "configs" / f"{preset}.yaml")
        params = lj.init_params(config, jax.random.key(0))
        hf = load_ours_into_hf(hf_model(config), config, params).eval()
        weight_bytes = 4 * lj.param_count(config)
        floor = bw / weight_bytes  # tokens/s if each step only read the weights once
        results = {}
        for batch in (1, 8):
            results[("llama_jax", batch)] = ours_generate(params, config, batch, args.prompt_len, args.new_tokens)
            results[("transformers", batch)] = hf_generate(hf, batch, args.prompt_len, args.new_tokens)
        hf1 = results[("transformers", 1)][1]
        ours1 = results[("llama_jax", 1)][1]
        for (name, batch), (prefill_s, step_s) in results.items():
            rows.append([preset, name, batch, f"{batch * args.prompt_len / prefill_s:,.0f}",
                         f"{batch / step_s:,.1f}", f"{1000 * step_s:.1f}", f"{hf1 / step_s * batch:.2f}x"
                         if name != "transformers" else "1.00x" if batch == 1 else f"{hf1 / step_s * batch:.2f}x",
                         f"{100 * (1 / step_s) / floor:.0f}%" if batch == 1 else
                         f"{step_s / (ours1 if name == 'llama_jax' else hf1):.2f}x"])
        print(rows[-len(results):], flush=True)
    print(table(f"Generation (float32, CPU; prompt {args.prompt_len} tokens, {args.new_tokens} new, greedy)",
                ["preset", "implementation", "batch", "prefill tok/s", "decode tok/s", "ms/step",
                 "decode vs HF batch 1", "batch 1: % of bandwidth floor; batch 8: step cost vs batch 1"], rows))


if __name__ == "__main__":
    main()
