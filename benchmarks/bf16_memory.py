"""Peak memory and speed of Keras generation in 16-bit weights, with and without XLA.

XLA on CPU has no bfloat16 products: it widens every kernel to float32 and keeps the widened
copies alive together, so a bfloat16 model's generation step peaked at about 3x its weights
(`gemma_keras.generation.uses_xla` now keeps 16-bit models off XLA). This script measures
that on the 2B's width with --layers of its 26 layers (zero weights: memory and speed do not
depend on the values), one subprocess per (dtype, XLA) so each peak is its own: the resident
peak after building, then over a prefill of a 32-token chunk and DECODE decode steps, and
the decode speed.

    flock /tmp/gemma_bench.lock .venv/bin/python benchmarks/bf16_memory.py --layers 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time

import machine

DECODE = 4


def child(dtype, xla, layers):
    from gemma_keras import generation
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.config import Gemma2Config

    generation.uses_xla = lambda model: xla  # the choice under test
    full = Gemma2Config.preset("gemma2_2b")
    config = dataclasses.replace(full, num_hidden_layers=layers,
                                 layer_types=full.layer_types[:layers])
    model = Gemma2CausalLM.empty(config, dtype=dtype)
    weights = sum(v.numpy().nbytes for v in model.weights) / 2**30
    built = machine.rss_bytes() / 2**30
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak from here on
    prompt = [config.bos_token_id, *range(100, 131)]
    list(generation.generate_ids(model, [prompt], max_new_tokens=2, stop_token_ids=()))
    start = time.perf_counter()
    steps = list(generation.generate_ids(model, [prompt], max_new_tokens=DECODE + 1,
                                         stop_token_ids=()))
    seconds = time.perf_counter() - start
    print(json.dumps(dict(dtype=dtype, xla=xla, layers=layers, weights_gib=weights,
                          built_gib=built, peak_gib=machine.peak_rss_bytes() / 2**30,
                          seconds=seconds, tokens=len(steps))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        dtype, xla, layers = args.child
        return child(dtype, xla == "xla", int(layers))
    print(machine.describe())
    print(f"\nGemma 2 2B width, {args.layers} layers; prefill 32 tokens then {DECODE} decode"
          " steps (timed after a warm-up on the same shapes)\n")
    print("| dtype | XLA | weights GiB | after build GiB | peak in generation GiB "
          "| peak / weights | generate s |")
    print("|---|---|---|---|---|---|---|")
    for dtype in ("bfloat16", "float32"):
        for xla in ("xla", "no-xla"):
            out = subprocess.run([sys.executable, __file__, "--child", dtype, xla,
                                  str(args.layers)], capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if not lines:
                print(f"| {dtype} | {xla} | failed: {out.stderr[-300:]!r} |")
                continue
            r = json.loads(lines[-1])
            print(f"| {dtype} | {xla} | {r['weights_gib']:.2f} | {r['built_gib']:.2f} "
                  f"| {r['peak_gib']:.2f} | {r['peak_gib'] / r['weights_gib']:.2f} "
                  f"| {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
