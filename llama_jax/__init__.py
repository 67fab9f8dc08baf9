"""llama_jax: a functional LLaMA in JAX. The public API; see README.md and docs/."""

from llama_jax.config import ConfigError, ModelConfig, load_model_config
from llama_jax.decode import generate, stream
from llama_jax.hf import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from llama_jax.model import (
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
from llama_jax.tokenizer import Tokenizer, train_tokenizer

__version__ = "0.1.0"
