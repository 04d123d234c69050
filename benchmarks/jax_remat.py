"""Does rematerialisation lower the memory of a JAX gradient on this CPU? XLA's own buffer
plan (the compiled gradient's temporary bytes) for a chain of MLP blocks, three ways:
stored activations, `jax.checkpoint` on each block, and a `jax.custom_vjp` that saves the
block's input and recomputes the block after a data dependency on the incoming gradient
(`gemma_keras.remat.recompute_after_gradient`, what `tf.recompute_grad` does under XLA).
Pure JAX on explicit weights: a few seconds, no lock.

  .venv/bin/python benchmarks/jax_remat.py
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["KERAS_BACKEND"] = "jax"  # matmul.read_after orders by the backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import machine  # noqa: E402
from gemma_keras.remat import recompute_after_gradient  # noqa: E402

LAYERS, TOKENS, WIDTH, HIDDEN = 8, 512, 256, 2048


def block(w, x):
    """A gated MLP with a residual, as a Gemma block's second half."""
    return x + (jax.nn.gelu(x @ w[0]) * (x @ w[1])) @ w[2]


WAYS = {
    "stored activations": block,
    "jax.checkpoint": jax.checkpoint(block),
    "jax.checkpoint, nothing_saveable": jax.checkpoint(
        block, policy=jax.checkpoint_policies.nothing_saveable),
    "custom_vjp ordered on the gradient": lambda w, x: recompute_after_gradient(block, w, x),
}


def temp_bytes(fn, weights, x):
    def loss(weights, x):
        for w in weights:
            x = fn(w, x)
        return (x**2).sum()

    compiled = jax.jit(jax.grad(loss)).lower(weights, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main():
    keys = jax.random.split(jax.random.PRNGKey(0), LAYERS)
    weights = [tuple(jax.random.normal(k, shape) * 0.02 for shape in
                     ((WIDTH, HIDDEN), (WIDTH, HIDDEN), (HIDDEN, WIDTH))) for k in keys]
    x = jnp.ones((TOKENS, WIDTH))
    print(f"# {machine.describe()}; jax {jax.__version__}; {LAYERS} blocks, {TOKENS} tokens, "
          f"width {WIDTH}, hidden {HIDDEN}; one block's activations "
          f"{3 * TOKENS * HIDDEN * 4 / 2**20:.0f} MiB")
    print("| remat | gradient's temporary MiB |")
    print("|---|---|")
    for name, fn in WAYS.items():
        print(f"| {name} | {temp_bytes(fn, weights, x) / 2**20:.1f} |")


if __name__ == "__main__":
    main()
