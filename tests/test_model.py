import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax import model


def rand(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, dtype)


# --- building blocks against independent NumPy formulas -------------------------------------------------------


def test_rms_norm_matches_numpy():
    x, w = np.asarray(rand(0, (3, 5, 16))), np.asarray(rand(1, (16,)))
    expected = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(lj.rms_norm(x, w, 1e-5), expected, rtol=1e-5, atol=1e-6)


def test_rms_norm_statistics_in_float32_for_bfloat16_input():
    # Squares of large bf16 values overflow nothing and lose nothing when accumulated in float32.
    x = (rand(0, (4, 256)) * 300).astype(jnp.bfloat16)
    out = lj.rms_norm(x, jnp.ones(256), 1e-6)
    assert out.dtype == jnp.bfloat16
    ref = lj.rms_norm(x.astype(jnp.float32), jnp.ones(256), 1e-6)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1e-2)


def test_swiglu_matches_numpy():
    x, g, u, d = (np.asarray(rand(i, s)) for i, s in enumerate([(2, 3, 8), (8, 12), (8, 12), (12, 8)]))
    silu = lambda a: a / (1 + np.exp(-a))
    np.testing.assert_allclose(lj.swiglu(x, g, u, d), (silu(x @ g) * (x @ u)) @ d, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lj.swiglu(x, g.T, u.T, d.T, out_in=True), (silu(x @ g) * (x @ u)) @ d, rtol=1e-5,
                               atol=1e-5)


def test_lm_head_is_float32_matmul():
    x, w = rand(0, (2, 3, 8), jnp.bfloat16), rand(1, (8, 11), jnp.bfloat16)
    out = lj.lm_head(x, w)
    assert out.dtype == jnp.float32 and out.shape == (2, 3, 11)
    expected = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-2, atol=1e-2)


def test_rope_matches_complex_rotation_of_split_halves():
    H, theta = 16, 10000.0
    x = np.asarray(rand(0, (2, 5, 3, H)))
    pos = np.array([[0, 1, 2, 7, 100], [3, 3, 9, 0, 1]])
    # Independent formula: pair (i, i + H/2) as a complex number, multiply by e^{i * pos * theta^(-2i/H)}.
    freqs = theta ** (-np.arange(0, H, 2) / H)
    z = (x[..., : H // 2] + 1j * x[..., H // 2:]) * np.exp(1j * pos[:, :, None, None] * freqs)
    expected = np.concatenate([z.real, z.imag], axis=-1)
    out = lj.apply_rope(jnp.asarray(x), jnp.asarray(pos), lj.rope_frequencies(H, theta))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_rope_scores_depend_only_on_position_difference():
    H = 32
    inv_freq = lj.rope_frequencies(H, 10000.0, "llama3", 8.0, 1.0, 4.0, 64)
    q, k = rand(0, (1, 1, 1, H)), rand(1, (1, 1, 1, H))

    def score(pq, pk):
        rq = lj.apply_rope(q, jnp.array([[pq]]), inv_freq)
        rk = lj.apply_rope(k, jnp.array([[pk]]), inv_freq)
        return float(jnp.sum(rq * rk))

    for shift in (1, 17, 500):
        assert score(5, 2) == pytest.approx(score(5 + shift, 2 + shift), rel=1e-4, abs=1e-4)
    assert score(5, 2) != pytest.approx(score(6, 2), rel=1e-3)


def test_rope_tables_equal_computed_angles_and_keep_sine_out_of_the_step(small_config, monkeypatch):
    c = small_config.replace(rope_scaling="llama3", rope_factor=8.0, rope_original_max_positions=16)
    inv_freq = lj.rope_frequencies(c.head_dim, c.rope_theta, "llama3", 8.0, original_max_positions=16)
    pos = jnp.array([[0, 1, 2, c.max_seq_len - 1], [5, 0, 1, 2]])
    for table, computed in zip(model._rope(c, pos), model._cos_sin(pos, inv_freq)):
        np.testing.assert_array_equal(table, computed)
    assert np.isnan(model._rope(c, pos + 1)[0][0, -1]).all()  # past the context: NaN, not a clamped angle
    assert np.isnan(model._rope(c, pos - 1)[1][1, 1]).all()  # nor a wrapped-around one
    params = lj.init_params(c, jax.random.key(0))
    step = jax.jit(lambda p, t: lj.forward(p, t, c).sum())
    assert " sine(" not in step.lower(params, pos).compile().as_text()
    monkeypatch.setattr(model, "ROPE_TABLE_MAX", 0)  # contexts too long for a table compute the angles
    for table, computed in zip(model._rope(c, pos + 1), model._cos_sin(pos + 1, inv_freq)):
        np.testing.assert_array_equal(table, computed)  # finite past max_seq_len: no table was read


def test_rope_scaling_rules():
    base = lj.rope_frequencies(64, 500000.0)
    np.testing.assert_allclose(lj.rope_frequencies(64, 500000.0, "linear", 4.0), base / 4, rtol=1e-6)
    scaled = lj.rope_frequencies(64, 500000.0, "llama3", 32.0, 1.0, 4.0, 8192)
    wavelen = 2 * np.pi / base
    high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
    np.testing.assert_allclose(scaled[high], base[high])  # short wavelengths untouched
    np.testing.assert_allclose(scaled[low], base[low] / 32, rtol=1e-6)  # long ones divided by the factor
    mid = ~high & ~low
    assert mid.any() and np.all(scaled[mid] < base[mid]) and np.all(scaled[mid] > base[mid] / 32)


def numpy_attention(q, k, v, mask):
    """Repeats K/V heads explicitly: the independent multi-head formula."""
    G = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_gqa_attention_equals_repeated_heads(n_heads, n_kv_heads):
    B, T, H = 2, 7, 8
    q, k, v = rand(0, (B, T, n_heads, H)), rand(1, (B, T, n_kv_heads, H)), rand(2, (B, T, n_kv_heads, H))
    idx = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = lj.causal_mask(idx, idx)
    expected = numpy_attention(*(np.asarray(a) for a in (q, k, v, mask)))
    for impl in ("reference", "jax", "auto"):
        np.testing.assert_allclose(lj.attention(q, k, v, mask, implementation=impl), expected, atol=1e-5)
        # is_causal (what the fused kernels take instead of a dense mask) is the same causal mask
        np.testing.assert_allclose(lj.attention(q, k, v, implementation=impl, is_causal=True), expected, atol=1e-5)


def test_segment_ids_block_cross_document_attention():
    B, T, N, H = 1, 6, 2, 4
    q, k, v = rand(0, (B, T, N, H)), rand(1, (B, T, N, H)), rand(2, (B, T, N, H))
    seg = jnp.array([[0, 0, 0, 1, 1, 1]])
    idx = jnp.arange(T)[None]
    mask = lj.causal_mask(idx, idx, seg, seg)
    assert not mask[0, 3, :3].any() and mask[0, 4, 3:5].all()
    out = lj.attention(q, k, v, mask)
    # The second document alone gives the same outputs: nothing leaked from the first.
    alone = lj.attention(q[:, 3:], k[:, 3:], v[:, 3:], lj.causal_mask(idx[:, :3], idx[:, :3]))
    np.testing.assert_allclose(out[:, 3:], alone, atol=1e-6)
    for impl in ("jax",):
        np.testing.assert_allclose(lj.attention(q, k, v, mask, implementation=impl), out, atol=1e-5)


# --- the model ---------------------------------------------------------------------------------------------------


def test_forward_shapes_and_dtypes(small_config):
    params = lj.init_params(small_config, jax.random.key(0))
    tokens = jnp.zeros((2, 9), jnp.int32)
    logits = jax.jit(lj.forward, static_argnums=2)(params, tokens, small_config)
    assert logits.shape == (2, 9, 97) and logits.dtype == jnp.float32
    bf16 = small_config.replace(dtype="bfloat16")
    logits16 = lj.forward(params, tokens, bf16)
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(logits16, logits, atol=0.05 * float(jnp.abs(logits).max()))


def test_causality_through_logits_and_gradients(small_config):
    params = lj.init_params(small_config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, 97)
    t = 5
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 1) % 97)
    a, b = lj.forward(params, tokens, small_config), lj.forward(params, changed, small_config)
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:])

    # Through gradients: d logits[t] / d (input embedding at s) is zero for every s > t. Feed the embeddings as
    # extra vocabulary rows so the gradient w.r.t. each position's input vector is separate.
    T, V = tokens.shape[1], small_config.vocab_size
    config = small_config.replace(vocab_size=V + T)
    base = {**params, "lm_head": jnp.pad(params["lm_head"], ((0, 0), (0, T)))}

    def logits_at_t(emb_TD):
        p = {**base, "embed": jnp.concatenate([params["embed"], emb_TD], 0)}
        return model.forward(p, jnp.arange(V, V + T)[None], config)[0, t].sum()

    grad_TD = jax.grad(logits_at_t)(params["embed"][tokens[0]])
    norms = jnp.linalg.norm(grad_TD, axis=-1)
    assert jnp.all(norms[t + 1:] == 0) and jnp.all(norms[: t + 1] > 0)


def test_scanned_layers_equal_python_loop(small_config):
    params = lj.init_params(small_config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 97)
    c = small_config
    x = params["embed"][tokens]
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    mask = lj.causal_mask(pos, pos)
    rope = model._cos_sin(pos, lj.rope_frequencies(c.head_dim, c.rope_theta))  # computed, not forward's tables
    for i in range(c.n_layers):
        layer = jax.tree.map(lambda w: w[i], params["layers"])
        x, _ = model._block(layer, x, pos, mask, rope, c)
    expected = lj.lm_head(lj.rms_norm(x, params["final_norm"], c.norm_eps), params["lm_head"])
    np.testing.assert_allclose(lj.forward(params, tokens, c), expected, rtol=1e-5, atol=1e-5)


def test_unrolled_layers_give_the_scans_gradients_by_concatenation(small_config):
    params = lj.init_params(small_config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 97)
    weights = rand(2, (2, 10, 97))
    loss = lambda p, c: jnp.sum(lj.forward(p, tokens, c) * weights)
    unrolled = small_config.replace(scan_layers=False)
    g_scan = jax.grad(loss)(params, small_config.replace(scan_layers=True))
    g_loop = jax.grad(loss)(params, unrolled)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_scan, g_loop)
    # The stacked weights' gradient is one concatenate per weight, not L zero-padded per-layer copies summed.
    backward = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, unrolled))
    assert " pad[" not in backward and " concatenate[" in backward


@pytest.mark.parametrize("remat", ["full", "save_matmuls"])
def test_remat_policies_give_same_gradients(small_config, remat):
    params = lj.init_params(small_config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 97)
    loss = lambda p, c: lj.forward(p, tokens, c).sum()
    g0 = jax.grad(loss)(params, small_config)
    g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, small_config.replace(remat=remat))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g0, g1)


def test_attention_impl_switch_same_logits(small_config):
    params = lj.init_params(small_config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, 97)
    seg = jnp.array([[0] * 4 + [1] * 6, [0] * 10])
    for segment_ids in (seg, None):  # packed documents (dense mask) and plain causal (is_causal)
        ref = lj.forward(params, tokens, small_config.replace(attention_impl="reference"), segment_ids_BT=segment_ids)
        fast = lj.forward(params, tokens, small_config.replace(attention_impl="jax"), segment_ids_BT=segment_ids)
        np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_decode_layout_keeps_the_function(small_config, tie):
    """unstack_layers' decode layout (per-layer lists, [out, in] matrices, cast once) computes what the training
    layout computes, cached and uncached."""
    config = small_config.replace(tie_embeddings=tie)
    params = lj.init_params(config, jax.random.key(0))
    fast = model.unstack_layers(params)
    assert len(fast["layers"]) == config.n_layers and fast["layers"][0]["w_gate"].shape == (config.ffn_dim, config.dim)
    assert fast["lm_head"].shape == (config.dim, config.vocab_size)
    tokens = jnp.array([[3, 1, 4, 1, 5]])
    pos = jnp.broadcast_to(jnp.arange(5), (1, 5))
    expected = lj.forward(params, tokens, config)
    for p in (params, fast):
        out = lj.forward_cached(p, tokens, pos, lj.init_cache(config, 1, 8), config)[0]
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_decode_layout_casts_once(small_config):
    config = small_config.replace(dtype="bfloat16")
    params = lj.init_params(config, jax.random.key(0))
    fast = model.unstack_layers(params, config.dtype)
    cast = jax.tree.leaves([fast["layers"], fast["embed"], fast["lm_head"]])
    assert {w.dtype for w in cast} == {jnp.dtype("bfloat16")} and fast["final_norm"].dtype == jnp.float32
    tokens = jnp.array([[3, 1, 4, 1, 5]])
    pos = jnp.broadcast_to(jnp.arange(5), (1, 5))
    logits = [lj.forward_cached(p, tokens, pos, lj.init_cache(config, 1, 8), config)[0] for p in (params, fast)]
    np.testing.assert_allclose(logits[0], logits[1], rtol=2e-2, atol=2e-2)  # same bf16 weights, other layout


def test_packed_documents_equal_separate_forwards(small_config):
    params = lj.init_params(small_config, jax.random.key(0))
    a, b = jnp.array([[5, 6, 7, 8]]), jnp.array([[9, 10, 11]])
    packed = jnp.concatenate([a, b], 1)
    pos = jnp.array([[0, 1, 2, 3, 0, 1, 2]])
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 2]])
    out = lj.forward(params, packed, small_config, pos, seg)
    np.testing.assert_allclose(out[:, :4], lj.forward(params, a, small_config), atol=1e-5)
    np.testing.assert_allclose(out[:, 4:], lj.forward(params, b, small_config), atol=1e-5)


def test_cached_forward_equals_full_forward(small_config):
    params = lj.init_params(small_config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 97)
    full = lj.forward(params, tokens, small_config)
    for scan_layers in (False, True):
        cache = lj.init_cache(small_config, 2, 16)
        pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
        logits, cache = lj.forward_cached(params, tokens[:, :8], pos[:, :8], cache, small_config, scan_layers)
        np.testing.assert_allclose(logits, full[:, :8], atol=1e-5)
        for t in range(8, 12):
            logits, cache = lj.forward_cached(params, tokens[:, t:t + 1], pos[:, t:t + 1], cache, small_config,
                                              scan_layers)
            np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)


def test_a_batch_in_some_rows_of_a_bigger_cache_equals_its_own_cache(small_config):
    """hidden_cached(first_row=r) over a cache of 5 rows: the batch's hidden states and cache rows are those of a
    cache of exactly its rows, and the other rows stay as they were (a server's pool of slots)."""
    params = lj.init_params(small_config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, 97)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    K = small_config.n_kv_heads
    own_h, own = lj.hidden_cached(params, tokens, pos, lj.init_cache(small_config, 2, 16), small_config)
    other = jax.tree.map(lambda x: x + 1.0, lj.init_cache(small_config, 5, 16))  # rows that must not change
    for scan_layers in (False, True):
        for first_row in (0, 2, 3):
            h, cache = jax.jit(lambda c, r, s=scan_layers: lj.hidden_cached(params, tokens, pos, c, small_config, s,
                                                                            first_row=r))(other, first_row)
            np.testing.assert_allclose(h, own_h, atol=1e-6)
            for big, mine, before in zip(cache.k + cache.v, own.k + own.v, other.k + other.v):
                rows = slice(first_row * K, (first_row + 2) * K)
                np.testing.assert_allclose(big[rows, :6], mine[:, :6], atol=1e-6)
                np.testing.assert_array_equal(np.delete(np.asarray(big), np.r_[rows], 0),
                                              np.delete(np.asarray(before), np.r_[rows], 0))


def test_kv_cache_is_a_pytree_of_per_layer_slabs(small_config):
    cache = lj.init_cache(small_config, 3, 16)
    K, H = small_config.n_kv_heads, small_config.head_dim
    assert isinstance(cache, lj.KVCache) and cache.max_len == 16
    leaves = jax.tree.leaves(cache)
    assert len(leaves) == 2 * small_config.n_layers and all(x.shape == (3 * K, 16, H) for x in leaves)
    # It passes through jit (and donation) as a pytree and comes back the same type, written only where asked:
    # entry b * K + k of a layer's slab is KV head k of row b.
    params = lj.init_params(small_config, jax.random.key(0))
    step = jax.jit(lambda c, t, p: lj.forward_cached(params, t, p, c, small_config)[1], donate_argnums=0)
    tokens, positions = jnp.array([[5], [6], [7]]), jnp.array([[2], [0], [9]])
    cache = step(cache, tokens, positions)
    assert isinstance(cache, lj.KVCache)
    written = np.asarray(jnp.any(cache.k[0] != 0, axis=-1))  # [Z, S]
    expected = np.zeros_like(written)
    for b, pos in enumerate([2, 0, 9]):
        expected[b * K:(b + 1) * K, pos] = True
    np.testing.assert_array_equal(written, expected)


def test_init_params_structure_and_statistics(small_config):
    params = lj.init_params(small_config, jax.random.key(0))
    c = small_config
    assert params["layers"]["wq"].shape == (2, 32, 32) and params["layers"]["wk"].shape == (2, 32, 16)
    assert params["layers"]["w_down"].shape == (2, 48, 32) and params["lm_head"].shape == (32, 97)
    assert np.all(params["layers"]["attn_norm"] == 1)
    assert float(jnp.std(params["embed"])) == pytest.approx(0.02, rel=0.1)
    assert float(jnp.std(params["layers"]["wo"])) == pytest.approx(0.02 / 2, rel=0.15)
    assert "lm_head" not in lj.init_params(c.replace(tie_embeddings=True), jax.random.key(0))
    assert lj.param_count(c) == sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("preset,published", [("llama2-7b", 6.74e9), ("llama3-8b", 8.03e9),
                                              ("llama3.2-1b", 1.24e9), ("stories15M", 15.2e6),
                                              ("stories110M", 110e6)])
def test_preset_param_counts_match_published(preset, published):
    config = lj.load_model_config(f"configs/{preset}.yaml")
    assert lj.param_count(config) == pytest.approx(published, rel=0.005)


def test_flops_per_token_formula():
    c = lj.ModelConfig(vocab_size=100, dim=16, n_layers=2, n_heads=2, ffn_dim=32, tie_embeddings=False)
    per_layer = 16 * 16 * 4 + 3 * 16 * 32
    assert lj.flops_per_token(c, 8) == 6 * (2 * per_layer + 16 * 100) + 12 * 2 * 8 * 16


def test_argument_checks_survive_python_O():
    import subprocess
    import sys

    code = ("import jax.numpy as jnp, llama_jax as lj\n"
            "try:\n    lj.attention(jnp.ones((1, 2, 4, 8)), jnp.ones((1, 2, 3, 8)), jnp.ones((1, 2, 3, 8)))\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused: attention: q [B, T, N, H]" in out.stdout, out.stderr[-1000:]


def test_top_k_beyond_the_vocabulary_keeps_every_token(small_config):
    logits = jax.random.normal(jax.random.key(0), (2, small_config.vocab_size))
    np.testing.assert_array_equal(lj.top_k_filter(logits, small_config.vocab_size + 50), logits)
    params = lj.init_params(small_config, jax.random.key(0))
    out = lj.generate(params, small_config, [[1, 2, 3]], max_new_tokens=3, temperature=1.0, top_k=10**6, seed=1)
    assert len(out[0]) == 3


def test_a_sequence_past_the_context_is_refused_not_nan(small_config):
    params = lj.init_params(small_config, jax.random.key(0))
    n = small_config.max_seq_len
    assert np.isfinite(np.asarray(lj.forward(params, jnp.ones((1, n), jnp.int32), small_config))).all()
    with pytest.raises(ValueError, match=f"position {n} is past the model's context of {n} tokens"):
        lj.forward(params, jnp.ones((1, n + 1), jnp.int32), small_config)
    with pytest.raises(ValueError, match=f"position {n + 5} is past"):
        lj.forward(params, jnp.ones((1, 2), jnp.int32), small_config, jnp.array([[0, n + 5]]))
