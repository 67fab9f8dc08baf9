"""LLaMA as pure functions over one parameter pytree.

Shape letters, used in names and einsum strings the same way in every module of the package:
  B batch rows (the serving pool's rows are its slots), T query length, S key length (a KV cache's capacity),
  P a (padded) prompt's length, M new tokens, D model dim, N query heads, K key/value heads, G = N // K,
  H head dim, F feed-forward dim, V vocabulary, L layers,
  Z = B * K cache rows (a batch row's KV heads), Q = G * T query rows per cache row,
  R = B * T tokens flattened (the loss, scoring), C tokens per chunk, J chunks, A alternatives (top log-probs).

The parameter pytree (a plain dict; weights are [in, out] so y = x @ w; layers stacked on axis 0 for lax.scan):
  embed          [V, D]
  layers/
    attn_norm    [L, D]
    wq           [L, D, N*H]
    wk, wv       [L, D, K*H]
    wo           [L, N*H, D]
    ffn_norm     [L, D]
    w_gate, w_up [L, D, F]
    w_down       [L, F, D]
  final_norm     [D]
  lm_head        [D, V]      absent when config.tie_embeddings

Sampling reads a decode layout of the same parameters (`unstack_layers`): "layers" is a list of per-layer dicts
whose matrices are stored [out, in], and "lm_head" is always present as [D, V]. Its KV cache is a `KVCache`
(below): per layer a [Z, S, H] key array and value array; how far each row is filled is the caller's to track.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import ModelConfig
from llama_jax.matmul import matmul

_NEG_INF = -1e30  # finite, so a fully masked row (padding) gives a uniform softmax instead of NaN


# ---------------------------------------------------------------------------------------------------------------
# Building blocks: arrays and numbers in, arrays out; no config.


def rms_norm(x, weight, eps: float):
    """x: [..., D], weight: [D]. Statistics in float32 whatever x's dtype; returns x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    weight = weight.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return (y * weight).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float = 10000.0, scaling: str = "none", factor: float = 1.0,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     original_max_positions: int = 8192) -> np.ndarray:
    """Inverse frequencies [H/2] (float32) for RoPE, optionally scaled for longer contexts.

    "linear" divides every frequency by `factor` (position interpolation). "llama3" (Llama 3.1) divides only the
    low frequencies (wavelength > original_max_positions / low_freq_factor), keeps the high ones
    (wavelength < original_max_positions / high_freq_factor) and interpolates smoothly in between.
    """
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    inv_freq = inv_freq.astype(np.float32)
    if scaling == "none":
        return inv_freq
    if scaling == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32)
    if scaling != "llama3":
        raise ValueError(f"rope scaling {scaling!r} is not one of none, linear, llama3")
    wavelen = 2 * np.pi / inv_freq
    low_freq_wavelen = original_max_positions / low_freq_factor
    high_freq_wavelen = original_max_positions / high_freq_factor
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BTNH, positions_BT, inv_freq):
    """Rotates x by its per-row positions. Layout: split halves (as in Hugging Face Llama), i.e. dimension i is
    paired with i + H/2, not interleaved pairs (2i, 2i+1) as in Meta's original code. Computed in float32."""
    if not (x_BTNH.ndim == 4 and positions_BT.shape == x_BTNH.shape[:2]):
        raise ValueError(f"apply_rope: x must be [B, T, N, H] and positions [B, T], got {x_BTNH.shape} and "
                         f"{positions_BT.shape}")
    return _rotate(x_BTNH, _cos_sin(positions_BT, inv_freq))


def _cos_sin(positions_BT, inv_freq):
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)[None, None]
    return jnp.cos(angles_BTh), jnp.sin(angles_BTh)


def _rotate(x_BTNH, rope):
    """apply_rope with the angles' (cos, sin), each [B, T, H/2] float32."""
    cos, sin = rope[0][:, :, None, :], rope[1][:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNH.dtype)


def causal_mask(q_positions_BT, kv_positions_BS, q_segment_ids_BT=None, kv_segment_ids_BS=None):
    """[B, T, S] boolean: a query may see keys at its own position or earlier, in the same segment (document)."""
    mask = kv_positions_BS[:, None, :] <= q_positions_BT[:, :, None]
    if q_segment_ids_BT is not None:
        mask &= q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
    return mask


def attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS=None, *, implementation: str = "auto", is_causal: bool = False):
    """Grouped-query attention (K divides N) with a boolean mask (True = may attend; None = no masking).

    Build the usual causal / document mask with `causal_mask`, or pass is_causal=True (T == S, query i sees keys
    0..i) so that fused kernels skip the masked blocks instead of reading a dense mask. "reference" is plain XLA:
    K/V heads are not repeated; each group of G = N/K query heads reads its shared K/V head through an einsum.
    Scores and softmax are float32. "jax" and "cudnn" call jax.nn.dot_product_attention ("jax" lets JAX choose,
    which today means its unfused XLA version; "cudnn" is cuDNN's fused kernel, GPU and 16-bit inputs only).
    "auto" is "cudnn" where that kernel applies and "reference" everywhere else.
    """
    B, T, N, H = q_BTNH.shape
    _, S, K, _ = k_BSKH.shape
    if not (k_BSKH.shape == v_BSKH.shape == (B, S, K, H) and N % K == 0):
        raise ValueError(f"attention: q [B, T, N, H], k and v [B, S, K, H] with N a multiple of K; got "
                         f"{q_BTNH.shape}, {k_BSKH.shape}, {v_BSKH.shape}")
    if not (mask_BTS is None or mask_BTS.shape == (B, T, S)):
        raise ValueError(f"attention: mask must be [B, T, S] = {(B, T, S)}, got {mask_BTS.shape}")
    if not (not is_causal or T == S):
        raise ValueError(f"is_causal needs as many queries as keys, got {T} and {S}")
    if implementation == "auto":
        fused = jax.default_backend() == "gpu" and q_BTNH.dtype in (jnp.bfloat16, jnp.float16)
        implementation = "cudnn" if fused else "reference"
    if implementation in ("jax", "cudnn"):
        return jax.nn.dot_product_attention(
            q_BTNH, k_BSKH, v_BSKH, mask=None if mask_BTS is None else mask_BTS[:, None], is_causal=is_causal,
            implementation="cudnn" if implementation == "cudnn" else None)
    if implementation != "reference":
        raise ValueError(f"attention implementation {implementation!r} is not one of auto, reference, jax, cudnn")
    if is_causal:
        index_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
        causal_BTS = causal_mask(index_BT, index_BT)
        mask_BTS = causal_BTS if mask_BTS is None else mask_BTS & causal_BTS
    # Heads-major layout: each (batch, kv head) pair is then one plain matmul over (G*T) x S, which XLA runs about
    # twice as fast on CPU as the same einsum over the token-major layout.
    heads_major = lambda a_BSKH: a_BSKH.transpose(0, 2, 1, 3).reshape(B * K, S, H)
    return _attend_heads_major(q_BTNH, heads_major(k_BSKH), heads_major(v_BSKH), mask_BTS)


def _attend_heads_major(q_BTNH, k_ZSH, v_ZSH, mask_BTS):
    """The reference attention over keys/values laid out [B*K, S, H] (the KV cache's layout: entry b*K + k is KV
    head k of row b). One batch axis, so the two batched matmuls read keys and values without reshaping them."""
    B, T, N, H = q_BTNH.shape
    Z, S, _ = k_ZSH.shape
    K = Z // B
    G = N // K
    q_ZQH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(Z, G * T, H)
    scores_ZQS = matmul(q_ZQH, k_ZSH, transpose_b=True, out_dtype=jnp.float32) / math.sqrt(H)
    if mask_BTS is not None:
        scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_ZQS.reshape(B, K, G, T, S), _NEG_INF)
        scores_ZQS = scores_BKGTS.reshape(Z, G * T, S)
    probs_ZQS = jax.nn.softmax(scores_ZQS, axis=-1).astype(v_ZSH.dtype)
    out_ZQH = matmul(probs_ZQS, v_ZSH)
    return out_ZQH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def swiglu(x, w_gate, w_up, w_down, out_in: bool = False):
    """x: [..., D], w_gate/w_up: [D, F], w_down: [F, D]. down(silu(x @ gate) * (x @ up)).
    out_in=True: the weights are stored transposed ([F, D] and [D, F]), as in unstack_layers' decode layout."""
    mm = functools.partial(_linear, out_in=out_in)
    return mm(jax.nn.silu(mm(x, w_gate)) * mm(x, w_up), w_down)


def lm_head(x, w, transposed: bool = False):
    """x: [..., D], w: [D, V] -> float32 logits [..., V]. For tied embeddings pass the [V, D] embedding itself
    with transposed=True (read transposed in place rather than copied)."""
    return _token_matmul(x, w, jnp.float32, transposed)


# ---------------------------------------------------------------------------------------------------------------
# The model.


def head_matrix(params):
    """(w, transposed): the LM head's [D, V] matrix, or the [V, D] embedding with transposed=True when tied."""
    return (params["lm_head"], False) if "lm_head" in params else (params["embed"], True)


def logits(params, h_BTD, config: ModelConfig):
    """Float32 logits [..., V] from final-normed hidden states [..., D] (either parameter layout)."""
    w, transposed = head_matrix(params)
    return lm_head(h_BTD, w.astype(h_BTD.dtype), transposed)


def _token_matmul(x, w, out_dtype=None, transpose_w=False):
    """x [..., in] @ w [in, out] (or w [out, in] read transposed) with x's leading axes flattened to one token
    axis. Autodiff of a [B, T, in] product gives a weight gradient contracting two axes, and XLA:CPU then wrote the
    SwiGLU backward's gradients transposed inside their elementwise fusions, which then read their inputs column by
    column (slow; docs/benchmarks-log.md); one token axis avoids that."""
    y = matmul(x.reshape(-1, x.shape[-1]), w, transpose_b=transpose_w, out_dtype=out_dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _linear(x, w, out_in: bool):
    """x [..., in] times a weight stored [in, out] (training layout) or [out, in] (decode layout); a weight given
    as (w, a, b) adds a low-rank adapter's x @ a @ b (lora.py; training layout only).
    The decode layout computes (w @ x^T)^T: with the weight as the left operand XLA:CPU's few-row products ran
    faster (docs/benchmarks-log.md)."""
    if isinstance(w, tuple):
        w, a, b = w
        return _token_matmul(x, w) + _token_matmul(_token_matmul(x, a), b)
    if not out_in:
        return _token_matmul(x, w)
    return jnp.moveaxis(jax.lax.dot_general(w, x, (((1,), (x.ndim - 1,)), ((), ()))), 0, -1)


def _block(layer, x_BTD, positions_BT, mask_BTS, rope, config: ModelConfig, kv_cache=None, out_in=False,
           first_row=0):
    """One transformer block. With kv_cache=(k_ZSH, v_ZSH), this step's keys/values are written into the cache
    rows first_row .. first_row + B - 1 at their positions first and attention runs over those rows; returns
    (x, new_cache). out_in: the layer's matrices are stored [out, in] (unstack_layers' decode layout)."""
    B, T, _ = x_BTD.shape
    N, K, H = config.n_heads, config.n_kv_heads, config.head_dim
    mm = functools.partial(_linear, out_in=out_in)
    h_BTD = rms_norm(x_BTD, layer["attn_norm"], config.norm_eps)
    q_BTNH = _rotate(mm(h_BTD, layer["wq"]).reshape(B, T, N, H), rope)
    k_BTKH = _rotate(mm(h_BTD, layer["wk"]).reshape(B, T, K, H), rope)
    v_BTKH = mm(h_BTD, layer["wv"]).reshape(B, T, K, H)
    if kv_cache is None:
        # mask_BTS None means plain causal (no packed documents): fused kernels then skip the masked blocks.
        attn_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, mask_BTS, implementation=config.attention_impl,
                              is_causal=mask_BTS is None)
    else:  # write this step's keys/values at their positions of the [Z, S, H] cache, then attend to the batch's rows
        z_BTK = first_row * K + (jnp.arange(B) * K)[:, None, None] + jnp.arange(K)[None, None, :]
        slot_BT1 = positions_BT[:, :, None]
        k_ZSH = kv_cache[0].at[z_BTK, slot_BT1].set(k_BTKH.astype(kv_cache[0].dtype), mode="drop")
        v_ZSH = kv_cache[1].at[z_BTK, slot_BT1].set(v_BTKH.astype(kv_cache[1].dtype), mode="drop")
        kv_cache = (k_ZSH, v_ZSH)
        if k_ZSH.shape[0] != B * K:  # a cache of more rows than this batch: attend over the batch's rows only
            k_ZSH, v_ZSH = (jax.lax.dynamic_slice_in_dim(c, first_row * K, B * K) for c in kv_cache)
        # Always the heads-major reference over the cache, whatever attention_impl says: a fused kernel would need
        # the cache transposed (copied) every step, and a one-token query gains nothing from it.
        attn_BTNH = _attend_heads_major(q_BTNH, k_ZSH, v_ZSH, mask_BTS)
    x_BTD = x_BTD + mm(attn_BTNH.reshape(B, T, N * H), layer["wo"])
    h_BTD = rms_norm(x_BTD, layer["ffn_norm"], config.norm_eps)
    x_BTD = x_BTD + swiglu(h_BTD, layer["w_gate"], layer["w_up"], layer["w_down"], out_in=out_in)
    return x_BTD, kv_cache


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


ROPE_TABLE_MAX = 2**20  # entries per table (cos, sin): at most 8 MB of constants in the compiled step


def _rope(config: ModelConfig, positions_BT):
    """(cos, sin) of the RoPE angles at positions [B, T], each [B, T, H/2] float32, read from tables over positions
    0 .. max_seq_len - 1 built at trace time (positions outside the context come out NaN). Computed inside the step
    instead, XLA:CPU fuses cos and sin into every consumer and evaluates them once per element of q and k, all heads
    over (docs/benchmarks-log.md). Contexts too long for a table (llama3.2-1b's 131072 positions)
    compute them in the step."""
    inv_freq = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling, config.rope_factor,
                                config.rope_low_freq_factor, config.rope_high_freq_factor,
                                config.rope_original_max_positions)
    if config.max_seq_len * inv_freq.size > ROPE_TABLE_MAX:
        return _cos_sin(positions_BT, inv_freq)
    with jax.ensure_compile_time_eval():  # constants of the compiled step, equal to what _cos_sin computes
        tables = _cos_sin(jnp.arange(config.max_seq_len)[None], inv_freq)
    return tuple(t[0].at[positions_BT].get(mode="fill", fill_value=jnp.nan, wrap_negative_indices=False)
                 for t in tables)


def _check_tokens(tokens, positions, segment_ids):
    if not (tokens.ndim == 2):
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    for name, a in (("positions", positions), ("segment_ids", segment_ids)):
        if not (a is None or a.shape == tokens.shape):
            raise ValueError(f"{name} shape {a.shape} != tokens shape {tokens.shape}")


def check_token_ids(tokens, vocab_size: int) -> None:
    """Refuses non-integer tokens, and ids outside [0, vocab_size) that a lookup would clamp (outside jit only)."""
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"token ids must be integers, got dtype {tokens.dtype}")
    values = None if isinstance(tokens, jax.core.Tracer) else np.asarray(tokens)
    bad = values[(values < 0) | (values >= vocab_size)] if values is not None else []
    if len(bad):
        raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})")


def check_positions(positions, max_seq_len: int) -> None:
    """Refuses positions past the context (`positions`: an array, or a sequence length for 0 .. length - 1;
    outside jit only): RoPE's tables end there, and what lies beyond would come out NaN."""
    if isinstance(positions, jax.core.Tracer):
        return
    last = positions - 1 if isinstance(positions, int) else int(np.asarray(positions).max(initial=-1))
    if last >= max_seq_len:
        raise ValueError(f"position {last} is past the model's context of {max_seq_len} tokens (positions 0 .. "
                         f"{max_seq_len - 1})")


def check_params(params, config: ModelConfig) -> None:
    """Names the first leaf of `params` (training layout) missing, extra or shaped other than `config` implies: one
    line here instead of a reshape error deep inside jit."""
    if not isinstance(params, dict):
        raise ValueError(f"params must be the parameter dict of init_params, got {type(params).__name__}")
    if isinstance(params.get("layers"), list):
        return
    got, expected = _shapes(params), _shapes(param_shapes(config))
    for name, shape in expected.items():
        if tuple(got.get(name) or ()) != tuple(shape):
            state = "is missing" if name not in got else f"has shape {got[name]}"
            raise ValueError(f"params{name} {state}, but the config expects {shape}")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise ValueError(f"params{extra[0]} is not a parameter of this config"
                         + (" (tie_embeddings=True has no lm_head)" if extra[0] == "['lm_head']" else ""))


def hidden_states(params, tokens_BT, config: ModelConfig, positions_BT=None, segment_ids_BT=None, adapters=None):
    """Final-normed hidden states [B, T, D] in the compute dtype (what the LM head reads; the training loss
    uses this to avoid materialising all logits). Positions (below config.max_seq_len) default to 0..T-1; with
    segment ids, tokens attend only within their segment (packed documents). adapters: low-rank adapters
    {"wq": {"a": [L, in, r], "b": [L, r, out]}, ...} added to those projections, b already scaled (lora.scaled)."""
    _check_tokens(tokens_BT, positions_BT, segment_ids_BT)
    check_params(params, config)
    check_token_ids(tokens_BT, config.vocab_size)
    check_positions(tokens_BT.shape[1] if positions_BT is None else positions_BT, config.max_seq_len)
    B, T = tokens_BT.shape
    dtype = jnp.dtype(config.dtype)
    index_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    positions_BT = index_BT if positions_BT is None else positions_BT
    # Causality is by index within the window; positions (which may restart per document) only drive RoPE.
    # Without segment ids the mask is plain causal and is left to the attention kernel (None).
    mask_BTS = None if segment_ids_BT is None else causal_mask(index_BT, index_BT, segment_ids_BT, segment_ids_BT)
    rope = _rope(config, positions_BT)
    x_BTD = params["embed"].astype(dtype)[tokens_BT]

    def body(x_BTD, layer_and_adapter):
        layer, adapter = jax.tree.map(lambda w: w.astype(dtype), layer_and_adapter)
        layer = {**layer, **{t: (layer[t], ab["a"], ab["b"]) for t, ab in adapter.items()}}
        return _block(layer, x_BTD, positions_BT, mask_BTS, rope, config)[0], None

    if config.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT[config.remat], prevent_cse=False)
    stacked = (params["layers"], adapters or {})
    if config.scan_layers:
        x_BTD, _ = jax.lax.scan(body, x_BTD, stacked)
    else:
        for layer_and_adapter in _split_layers(stacked, config.n_layers):
            x_BTD, _ = body(x_BTD, layer_and_adapter)
    return rms_norm(x_BTD, params["final_norm"], config.norm_eps)


def _split_layers(layers, n: int) -> list:
    """Stacked [L, ...] layer weights as a list of L per-layer pytrees. Split rather than indexed one layer at a
    time: the gradient of one split is one concatenate, of L index slices L zero-padded copies summed (slower)."""
    leaves, treedef = jax.tree.flatten(layers)
    parts = [jnp.split(w, n) for w in leaves]
    return [treedef.unflatten([p[i][0] for p in parts]) for i in range(n)]


def forward(params, tokens_BT, config: ModelConfig, positions_BT=None, segment_ids_BT=None, adapters=None):
    """tokens int32 [B, T] -> float32 logits [B, T, V] (adapters: as hidden_states)."""
    h_BTD = hidden_states(params, tokens_BT, config, positions_BT, segment_ids_BT, adapters)
    return logits(params, h_BTD, config)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVCache:
    """The keys and values of the tokens seen so far, one [Z, S, H] array per layer for each (a pytree; pass it
    in and take the new one back). Row z = b * K + k is KV head k of batch row b, and entry s of a row holds the
    key/value of that row's token at position s, in the compute dtype.

    Why this layout (docs/benchmarks-log.md has the measurements): per-layer arrays let a decode step update each
    layer's slab in place; heads-major (S before H) lets attention read it without a transposed copy; rows and
    heads on one axis is what attention's batched matmuls take as it is (a [B, K, S, H] cache made XLA:CPU copy
    every layer's cache several times per step)."""

    k: list  # L arrays [Z, S, H]
    v: list  # L arrays [Z, S, H]

    @property
    def max_len(self) -> int:
        """S: the positions each row can hold."""
        return self.k[0].shape[1]


def init_cache(config: ModelConfig, batch: int, max_len: int) -> KVCache:
    """An empty `KVCache` of `batch` rows and `max_len` positions, in the compute dtype."""
    shape = (batch * config.n_kv_heads, max_len, config.head_dim)
    zeros = lambda: [jnp.zeros(shape, config.dtype) for _ in range(config.n_layers)]
    return KVCache(k=zeros(), v=zeros())


def hidden_cached(params, tokens_BT, positions_BT, cache: KVCache, config: ModelConfig, scan_layers: bool = False,
                  first_row=0):
    """Prefill or decode step over a KV cache: tokens [B, T] at per-row positions [B, T] (a row's positions are
    consecutive). Writes their keys/values into the cache and attends to every slot at or before each query's
    position, so earlier slots must hold that row's earlier tokens. Returns (final-normed hidden [B, T, D], cache).

    The cache may hold more rows than the batch (a server's pool of slots): the batch is its rows first_row ..
    first_row + B - 1 (first_row may be traced); the other rows are neither read nor written.

    scan_layers=False unrolls the layers and updates each layer's cache in place: the decode step's layout.
    scan_layers=True stacks the cache for lax.scan and splits it again (one copy, fine for a prefill; compile time
    stays flat in depth). `params` may be in the training layout or in unstack_layers' decode layout."""
    _check_tokens(tokens_BT, positions_BT, None)
    dtype = jnp.dtype(config.dtype)
    S = cache.max_len
    mask_BTS = causal_mask(positions_BT, jnp.broadcast_to(jnp.arange(S), (tokens_BT.shape[0], S)))
    rope = _rope(config, positions_BT)
    x_BTD = params["embed"][tokens_BT].astype(dtype)
    layers = jax.tree.map(lambda w: w.astype(dtype), params["layers"])  # a list stays a list
    if scan_layers:
        if not (isinstance(layers, dict)):
            raise ValueError("scan_layers=True needs stacked layers (not unstack_layers output)")

        def body(x_BTD, layer_and_kv):
            layer, k, v = layer_and_kv
            x_BTD, (k, v) = _block(layer, x_BTD, positions_BT, mask_BTS, rope, config, (k, v), first_row=first_row)
            return x_BTD, (k, v)
        stacked = (layers, jnp.stack(cache.k), jnp.stack(cache.v))
        x_BTD, (k_all, v_all) = jax.lax.scan(body, x_BTD, stacked)
        ks, vs = list(k_all), list(v_all)
    else:
        ks, vs = list(cache.k), list(cache.v)
        out_in = isinstance(layers, list)
        for i, layer in enumerate(layers if out_in else _split_layers(layers, config.n_layers)):
            x_BTD, (ks[i], vs[i]) = _block(layer, x_BTD, positions_BT, mask_BTS, rope, config, (ks[i], vs[i]),
                                           out_in=out_in, first_row=first_row)
    return rms_norm(x_BTD, params["final_norm"], config.norm_eps), KVCache(k=ks, v=vs)


_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def unstack_layers(params, dtype=None):
    """The decode layout of the parameters (a copy; pass it to hidden_cached / forward_cached / logits like the
    training layout), each choice measured faster on XLA:CPU (docs/benchmarks-log.md): "layers" becomes a list of
    per-layer dicts (XLA:CPU copies a slice of a stacked weight before each matmul); their matrices are stored
    [out, in] (one-row steps run faster over it); the LM head stays [D, V] (a contiguous copy for tied
    embeddings); with `dtype`, the weights are cast once here rather than in every step (the final norm stays as
    it is, as in `forward`)."""
    if isinstance(params["layers"], list):
        return params  # already in the decode layout
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    cast = (lambda w: w) if dtype is None else (lambda w: w.astype(dtype))
    layers = [{k: cast(w[i].T if k in _MATRICES else w[i]) for k, w in params["layers"].items()} for i in range(n)]
    head, transposed = head_matrix(params)
    out = {k: v for k, v in params.items() if k not in ("layers", "lm_head")}
    out.update(layers=layers, embed=cast(params["embed"]), lm_head=cast(head.T if transposed else head))
    return out


def forward_cached(params, tokens_BT, positions_BT, cache: KVCache, config: ModelConfig, scan_layers: bool = False):
    """`hidden_cached` followed by the LM head: (float32 logits [B, T, V], cache)."""
    h_BTD, cache = hidden_cached(params, tokens_BT, positions_BT, cache, config, scan_layers)
    return logits(params, h_BTD, config), cache


def init_params(config: ModelConfig, key):
    """LLaMA-style initialisation: normal(0, init_std) matrices, with the residual output projections (wo,
    w_down) scaled by 1/sqrt(2L) so the residual stream's variance does not grow with depth; norms at 1."""
    D, L, F, V = config.dim, config.n_layers, config.ffn_dim, config.vocab_size
    NH, KH = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    std, out_std = config.init_std, config.init_std / math.sqrt(2 * L)
    shapes = {
        "embed": ((V, D), std),
        "layers": {
            "attn_norm": ((L, D), None), "wq": ((L, D, NH), std), "wk": ((L, D, KH), std),
            "wv": ((L, D, KH), std), "wo": ((L, NH, D), out_std), "ffn_norm": ((L, D), None),
            "w_gate": ((L, D, F), std), "w_up": ((L, D, F), std), "w_down": ((L, F, D), out_std),
        },
        "final_norm": ((D,), None),
    }
    if not config.tie_embeddings:
        shapes["lm_head"] = ((D, V), std)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    inits = [jnp.ones(shape, jnp.float32) if s is None else s * jax.random.normal(k, shape, jnp.float32)
             for (shape, s), k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, inits)


@functools.lru_cache
def param_shapes(config: ModelConfig):
    """The parameter pytree's ShapeDtypeStructs (nothing allocated)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def _shapes(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): getattr(x, "shape", None) for p, x in leaves}


def param_count(config: ModelConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(config)))


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 per matmul weight (the embedding lookup is not a matmul,
    the LM head is) plus causal-free attention 12 * L * T * N * H, as in the PaLM paper's MFU appendix."""
    matmul_params = param_count(config) - config.vocab_size * config.dim * (0 if config.tie_embeddings else 1)
    matmul_params -= config.n_layers * 2 * config.dim + config.dim  # norms
    return 6.0 * matmul_params + 12.0 * config.n_layers * seq_len * config.n_heads * config.head_dim
