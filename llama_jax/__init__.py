"""llama_jax: a functional LLaMA in JAX. The public API; see README.md and docs/."""

from types import ModuleType as _ModuleType

from llama_jax.config import ConfigError, ModelConfig, load_model_config
from llama_jax.decode import generate, stream
from llama_jax.host_memory import keep_freed_memory
from llama_jax.model import (
    KVCache,
    apply_rope,
    attention,
    causal_mask,
    flops_per_token,
    forward,
    forward_cached,
    hidden_cached,
    hidden_states,
    init_cache,
    init_params,
    lm_head,
    param_count,
    rms_norm,
    rope_frequencies,
    swiglu,
)
from llama_jax.sampling import (
    apply_repetition_penalty,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
)

__version__ = "0.2.0"

# Imported on first use: `import llama_jax` stays light (no Orbax, tokenizers or safetensors until needed), and
# `python -m llama_jax.eval` runs its module fresh (runpy warns when a package has already imported it).
_LAZY = {"load_hf_checkpoint": "checkpoints.hf", "save_hf_checkpoint": "checkpoints.hf",
         "CheckpointError": "checkpoints.hf", "Tokenizer": "text.tokenizer", "HFTokenizer": "text.tokenizer",
         "load_tokenizer": "text.tokenizer", "train_tokenizer": "text.tokenizer", "load_checkpoint": "checkpoints.load",
         "Checkpoint": "checkpoints.load", "load_llama2c": "checkpoints.llama2c",
         "load_gguf": "checkpoints.gguf", "token_logprobs": "score",
         "score_continuations": "score", "UserError": "errors"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = globals()[name] = getattr(importlib.import_module(f"llama_jax.{_LAZY[name]}"), name)
        return value
    raise AttributeError(f"module 'llama_jax' has no attribute {name!r}")


__all__ = sorted([n for n, v in globals().items() if not n.startswith("_") and not isinstance(v, _ModuleType)]
                 + list(_LAZY))  # the functions and classes above, not the submodules their imports bind
