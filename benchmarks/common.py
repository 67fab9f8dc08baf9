"""Shared helpers for the benchmark scripts: timing, the PyTorch reference model, table printing."""

from __future__ import annotations

import os
import platform
import time

import numpy as np


def timeit(fn, warmup: int = 1, repeat: int = 5) -> float:
    """Median seconds per call of fn() (which must block until its work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def add_malloc_flag(parser) -> None:
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc as it is (by default the whole process, PyTorch included, keeps "
                             "freed memory for reuse, as train.py and generate.py do: llama_jax/host_memory.py)")


def set_malloc(args) -> str:
    """Applies the --default-malloc choice before any JAX or PyTorch work; returns a phrase for the header."""
    from llama_jax.host_memory import keep_freed_memory

    if not args.default_malloc and keep_freed_memory():
        return "malloc keeps freed memory (both implementations)"
    return "default malloc"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"


def hf_model(config, seed: int = 0):
    """transformers.LlamaForCausalLM with our config's shape (float32, CPU) and the same weights as ours."""
    import torch
    import transformers

    from llama_jax.checkpoints.hf import config_to_hf

    torch.manual_seed(seed)
    cfg = {k: v for k, v in config_to_hf(config).items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, attn_implementation="sdpa"))
    return model


def torch_train_step(config, batch: int, seq: int, *, device: str = "cpu", bf16: bool = False,
                     compiled: bool = False):
    """transformers.LlamaForCausalLM + torch.optim.AdamW on random tokens: a function running one full training
    step (forward, backward, clipping, update) and returning its loss (reading it synchronises the device)."""
    import torch

    model = hf_model(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device != "cpu")
    toks = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)
    x, y = toks[:, :-1], toks[:, 1:]

    def loss_fn(x, y):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x).logits
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    fwd = torch.compile(loss_fn) if compiled else loss_fn

    def step() -> float:
        loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def load_ours_into_hf(model, config, params):
    import torch

    from llama_jax.checkpoints.hf import hf_state_dict

    state = {k: torch.from_numpy(v) for k, v in hf_state_dict(config, params).items()}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=False)
    return model


def table(title: str, header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"
    out = [f"\n### {title}", "", line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)
