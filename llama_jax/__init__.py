"""llama_jax: a functional LLaMA in JAX. The public API; see README.md and docs/."""

__version__ = "0.2.0"

# Imported on first use: `import llama_jax` stays light (not even JAX is imported until a name is used), so that a
# command can take its stop signals before JAX loads (an import of JAX swallows a Ctrl-C that arrives during it),
# and `python -m llama_jax.eval` runs its module fresh (runpy warns when a package has already imported it).
_CORE = {"config": ("ConfigError", "LoraConfig", "ModelConfig", "load_model_config"), "decode": ("generate", "stream"),
         "host_memory": ("keep_freed_memory",), "lora": ("init_adapters", "merge_adapters"),
         "model": ("KVCache", "apply_rope", "attention", "causal_mask", "flops_per_token", "forward", "forward_cached",
                   "hidden_cached", "hidden_states", "init_cache", "init_params", "lm_head", "param_count", "rms_norm",
                   "rope_frequencies", "swiglu"),
         "sampling": ("apply_repetition_penalty", "min_p_filter", "sample", "top_k_filter", "top_p_filter")}
_OTHER = {"checkpoints.hf": ("load_hf_checkpoint", "save_hf_checkpoint", "CheckpointError"),
          "text.tokenizer": ("Tokenizer", "HFTokenizer", "load_tokenizer", "train_tokenizer"),
          "checkpoints.load": ("load_checkpoint", "Checkpoint"), "checkpoints.llama2c": ("load_llama2c",),
          "checkpoints.gguf": ("load_gguf",), "checkpoints.peft": ("load_peft_adapter", "save_peft_adapter"),
          "score": ("token_logprobs", "score_continuations"),
          "errors": ("UserError",)}
_LAZY = {name: module for table in (_CORE, _OTHER) for module, names in table.items() for name in names}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = globals()[name] = getattr(importlib.import_module(f"llama_jax.{_LAZY[name]}"), name)
        return value
    raise AttributeError(f"module 'llama_jax' has no attribute {name!r}")


__all__ = sorted(_LAZY)


def __dir__():
    return sorted({*globals(), *_LAZY})
