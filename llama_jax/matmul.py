"""Matrix products, written so that XLA:CPU runs bfloat16 ones on its bfloat16 kernels.

XLA:CPU multiplies bfloat16 matrices on its fast kernels (YNNPACK, which uses AMX on recent Xeons) only when both
operands are row-major arrays contracted as [M, K] x [K, N] or [M, K] x [N, K] and the product accumulates into
float32. Anything else is converted to float32 first and multiplied there: a bfloat16 result, and a transposed
operand - which autodiff produces for every weight gradient, since those contract the token axis. On a 2-core
Sapphire Rapids that float32 detour made bfloat16 training slower than float32 (docs/benchmarks-log.md).

`matmul` therefore writes bfloat16 products on the CPU in the form those kernels take, forward and backward (a
custom VJP that transposes operands explicitly). Elsewhere - float32, GPUs, TPUs - it is a plain lax.dot_general.
The bfloat16 CPU path supports reverse-mode autodiff only (jax.grad, jax.vjp), not forward mode (jax.jvp).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def matmul(a, b, *, transpose_b: bool = False, out_dtype=None):
    """a [..., M, K] @ b [..., K, N] -> [..., M, N], or b [..., N, K] with transpose_b; leading axes are batch axes
    (as many in a as in b). Mixed operand dtypes are promoted as jnp.matmul does. out_dtype: the result's dtype
    (default the operands'); bfloat16 products accumulate in float32 either way."""
    if not (a.ndim == b.ndim >= 2 and a.shape[:-2] == b.shape[:-2]):
        raise ValueError(f"matmul: operands of the same rank >= 2 with equal batch dimensions, got {a.shape} and "
                         f"{b.shape}")
    dtype = jnp.result_type(a, b)
    a, b = a.astype(dtype), b.astype(dtype)
    out_dtype = jnp.dtype(out_dtype or dtype)
    n_rows, n_cols = a.shape[-2], b.shape[-2] if transpose_b else b.shape[-1]
    if dtype == jnp.bfloat16 and jax.default_backend() == "cpu" and min(n_rows, n_cols) > 1:
        # (one-row products are matrix-vector products, which those kernels do not take)
        return _cpu_bf16_matmul(a, b, transpose_b, out_dtype)
    return _dot_general(a, b, transpose_b, None if out_dtype == dtype else out_dtype)


def _dot_general(a, b, transpose_b, preferred_element_type):
    n = a.ndim - 2
    batch = tuple(range(n))
    dims = (((n + 1,), (n + 1 if transpose_b else n,)), (batch, batch))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=preferred_element_type)


def _row_major(x):
    """x as a row-major array. Flattening forces any pending transpose to be materialised, and the barrier keeps
    XLA from folding it back into the product as a column-major operand (which the bfloat16 kernels refuse)."""
    return jax.lax.optimization_barrier(x.reshape(-1)).reshape(x.shape)


def _bf16_dot(a, b, transpose_b, out_dtype, swap_a=False):
    """The product in float32 from bfloat16 operands; swap_a: multiply a's transpose (materialised row-major).
    Barriers keep XLA from folding transposes of the operands or of the result into the product after it chose
    the bfloat16 kernel for it: it then swaps the operands into a form that kernel refuses and fails at run time.
    (Flattening every operand instead of only the transposed one cost a copy per product.)"""
    a = _row_major(jnp.swapaxes(a, -1, -2)) if swap_a else jax.lax.optimization_barrier(a)
    y = _dot_general(a, jax.lax.optimization_barrier(b), transpose_b, jnp.float32)
    return jax.lax.optimization_barrier(y).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cpu_bf16_matmul(a, b, transpose_b, out_dtype):
    return _bf16_dot(a, b, transpose_b, out_dtype)


def _cpu_bf16_matmul_fwd(a, b, transpose_b, out_dtype):
    return _bf16_dot(a, b, transpose_b, out_dtype), (a, b)


def _cpu_bf16_matmul_bwd(transpose_b, out_dtype, residuals, g):
    a, b = residuals
    g = g.astype(a.dtype)
    da = _bf16_dot(g, b, not transpose_b, a.dtype)  # g [M, N] times b's [K, N] transposed
    # b's gradient contracts the rows of a and g, i.e. a's first axis: a refused form unless a is transposed.
    db = _bf16_dot(a, g, False, jnp.float32, swap_a=True)  # [K, M] x [M, N]
    return da, (jnp.swapaxes(db, -1, -2) if transpose_b else db).astype(b.dtype)


_cpu_bf16_matmul.defvjp(_cpu_bf16_matmul_fwd, _cpu_bf16_matmul_bwd)
