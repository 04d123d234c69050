"""Rematerialisation on JAX that works on XLA's CPU backend.

`jax.checkpoint` barely lowers a gradient's memory there: XLA merges the recomputation with
the forward pass or schedules it early (benchmarks/jax_remat.py measures it). The
`jax.custom_vjp` here stores only the function's inputs and recomputes it in the backward
pass after a data dependency on the incoming gradient, as `tf.recompute_grad` does.
"""

from __future__ import annotations

from gemma_keras.matmul import read_after


def recompute_after_gradient(f, params, x):
    """`f(params, x)`, differentiable in both, storing only `params` and `x`: the backward
    pass recomputes `f` once the gradient reaching it exists (`matmul.read_after`)."""
    import jax

    @jax.custom_vjp
    def recomputed(params, x):
        return f(params, x)

    def forward(params, x):
        return f(params, x), (params, x)

    def backward(saved, gradient):
        params, x = saved
        return jax.vjp(f, params, read_after(x, gradient))[1](gradient)

    recomputed.defvjp(forward, backward)
    return recomputed(params, x)
