import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import optim
from llama_jax.matmul import matmul
from llama_jax.train import step as T
from tests.test_train import small_setup


def _reference_and_grads(a, b, g, transpose_b):
    """Float64 numpy product and its gradients (the cotangent g rounded like the operands)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    g64 = np.asarray(jnp.asarray(g, a.dtype), np.float64)
    bt = np.swapaxes(b64, -1, -2) if transpose_b else b64  # [..., K, N]
    da = g64 @ np.swapaxes(bt, -1, -2)
    db = np.swapaxes(a64, -1, -2) @ g64
    return a64 @ bt, da, np.swapaxes(db, -1, -2) if transpose_b else db


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("batch", [(), (3,)])
def test_matmul_values_and_gradients_match_float64(dtype, transpose_b, batch):
    # On the CPU, bfloat16 takes the custom-VJP path (explicit transposes); both paths must be the plain product.
    M, K, N = 24, 40, 16
    keys = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(keys[0], (*batch, M, K)).astype(dtype)
    b = jax.random.normal(keys[1], (*batch, N, K) if transpose_b else (*batch, K, N)).astype(dtype)
    g = jax.random.normal(keys[2], (*batch, M, N))
    for out_dtype in (None, jnp.float32):
        f = jax.jit(lambda a, b, out_dtype=out_dtype: matmul(a, b, transpose_b=transpose_b, out_dtype=out_dtype))
        y, vjp = jax.vjp(f, a, b)
        assert y.dtype == (out_dtype or a.dtype) and y.shape == (*batch, M, N)
        da, db = vjp(g.astype(y.dtype))
        assert da.dtype == a.dtype and db.dtype == b.dtype
        tol = 1e-5 if dtype == "float32" else 2e-2  # bfloat16 rounds each result to 8 bits of mantissa
        for got, want in zip((y, da, db), _reference_and_grads(a, b, g, transpose_b)):
            np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * np.abs(want).max())


def test_matmul_promotes_mixed_operands_like_jnp_matmul():
    a, b = jnp.ones((4, 8), jnp.bfloat16), jnp.full((8, 3), 0.5, jnp.float32)
    y = matmul(a, b)
    assert y.dtype == jnp.matmul(a, b).dtype == jnp.float32
    np.testing.assert_array_equal(y, np.full((4, 3), 4.0))


def _dot_operand_dtypes(hlo: str):
    """(result, lhs, rhs) dtypes of every dot in compiled HLO text, inside fusions included."""
    defined = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    dots = re.findall(r"= (\w+)\[[^\]]*\]\{[^}]*\} dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
    return [(out, defined[lhs], defined[rhs]) for out, lhs, rhs in dots]


@pytest.mark.parametrize("tie_embeddings,scan_layers", [(True, True), (False, False)])
def test_bfloat16_train_step_multiplies_bfloat16_on_the_cpu(tie_embeddings, scan_layers):
    # XLA:CPU converts the operands of a bfloat16 product it cannot give its bfloat16 kernels to float32 (3-5x
    # slower, docs/benchmarks-log.md). On the CPU every product of the bfloat16 training step - layers, attention,
    # LM head, forward and backward - must reach XLA as bfloat16 operands accumulating in float32. GPUs and TPUs
    # keep the plain products: no optimization barriers in their step.
    config, train, batch = small_setup()
    config = dataclasses.replace(config, dtype="bfloat16", tie_embeddings=tie_embeddings, scan_layers=scan_layers)
    state = optim.init_state(config, train, jax.random.key(0))
    step, _ = T.jit_steps(config, train)
    lowered = step.lower(state, batch)
    if jax.default_backend() == "cpu":
        dots = _dot_operand_dtypes(lowered.compile().as_text())
        # layers (3 products forward, 6 backward, per matrix), attention (2 + 4) and the LM head (1 + 2)
        assert len(dots) >= 7 * 3 + 6 + 3, dots
        assert set(dots) == {("f32", "bf16", "bf16")}, dots
    else:
        assert "optimization_barrier" not in lowered.as_text()
    # It runs (a product XLA routes to its generic kernel with bfloat16 operands fails at run time) and learns
    # what float32 learns.
    f32_config = dataclasses.replace(config, dtype="float32")
    f32_state = optim.init_state(f32_config, train, jax.random.key(0))
    f32_step, _ = T.jit_steps(f32_config, train)
    losses = []
    for _ in range(4):
        state, m = step(state, batch)
        f32_state, m32 = f32_step(f32_state, batch)
        np.testing.assert_allclose(m["loss"], m32["loss"], rtol=2e-2)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
