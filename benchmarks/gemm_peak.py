"""The float32 matmul peak of this CPU (NumPy, TensorFlow, torch), and the FLOPs of one LoRA
step of the Gemma 2 2B: how many tokens/s the compute alone allows.

A LoRA step on frozen weights costs two matmul passes over the weights (the forward, and the
backward's activation gradients `dY @ W`; no weight gradients except the adapters', which
are negligible), plus a third forward pass of the blocks under remat, plus attention's
score and value products (two in the forward, four in the backward). `step_flops` counts
those; the ceiling is the measured peak over the FLOPs per token.

  flock /tmp/gemma_bench.lock .venv/bin/python benchmarks/gemm_peak.py
"""

from __future__ import annotations

import time

import numpy as np

import machine

# [tokens, in] @ [in, out]: the 2B's MLP up-projection at 128 and 512 tokens, and its head
SHAPES = ((128, 2304, 9216), (512, 2304, 9216), (512, 9216, 2304), (128, 2304, 32000))


def step_flops(config, batch, seq, remat=False):
    """FLOPs of one LoRA training step (frozen base) for `batch` sequences of `seq` tokens."""
    tokens = batch * seq
    block_params = config.num_parameters() - config.vocab_size * config.hidden_size
    head = config.vocab_size * config.hidden_size
    attention = (2 * 2 * seq * config.num_attention_heads * config.head_dim
                 * config.num_hidden_layers * tokens)  # QK^T and PV, full (masked) squares
    block_passes = 3 if remat else 2
    return (2 * tokens * (block_passes * block_params + 2 * head)
            + attention * (block_passes + 2))


def best_seconds(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def gflops_table():
    import tensorflow as tf
    import torch

    rows = []
    for m, k, n in SHAPES:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((n, k), dtype=np.float32)  # [out, in], as the layers keep it
        ta, tb = tf.constant(a), tf.constant(b)
        pa, pb = torch.from_numpy(a), torch.from_numpy(b)
        flops = 2 * m * k * n
        rows.append(((m, k, n), {
            "numpy": flops / best_seconds(lambda: a @ b.T) / 1e9,
            "tensorflow": flops / best_seconds(
                lambda: tf.matmul(ta, tb, transpose_b=True).numpy()) / 1e9,
            "torch": flops / best_seconds(lambda: pa @ pb.T) / 1e9,
        }))
    return rows


def main():
    import torch

    from gemma_keras.config import Gemma2Config

    print(f"# {machine.describe()}; float32; torch threads {torch.get_num_threads()}; best of 5")
    print("| [tokens, in] x [in, out] | NumPy GFLOPS | TensorFlow GFLOPS | torch GFLOPS |")
    print("|---|---|---|---|")
    best = 0.0
    for (m, k, n), g in gflops_table():
        best = max(best, *g.values())
        print(f"| [{m}, {k}] x [{k}, {n}] | {g['numpy']:.0f} | {g['tensorflow']:.0f} "
              f"| {g['torch']:.0f} |")
    config = Gemma2Config.preset("gemma2_2b")
    print(f"\nLoRA step FLOPs of the 2B, and the tokens/s a {best:.0f} GFLOPS peak allows:\n")
    print("| batch x seq | remat | TFLOP a step | GFLOP a token | ceiling tokens/s |")
    print("|---|---|---|---|---|")
    for batch, seq in ((1, 128), (1, 512), (4, 128)):
        for remat in (False, True):
            flops = step_flops(config, batch, seq, remat)
            print(f"| {batch}x{seq} | {'yes' if remat else 'no'} | {flops / 1e12:.2f} "
                  f"| {flops / batch / seq / 1e9:.2f} | {best * 1e9 * batch * seq / flops:.1f} |")


if __name__ == "__main__":
    main()
