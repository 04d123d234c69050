"""Build the full Gemma 2 2B preset with random weights; print parameters, time and peak RSS.

Usage: flock /tmp/gemma_bench.lock .venv/bin/python benchmarks/build_2b.py [--dtype float32]
"""

import argparse
import time

import machine


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="gemma2_2b")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    from gemma_keras import Gemma2CausalLM, Gemma2Config

    start = time.perf_counter()
    model = Gemma2CausalLM(args.preset, dtype=args.dtype)
    seconds = time.perf_counter() - start
    params = model.count_params()
    expected = Gemma2Config.preset(args.preset).num_parameters()
    peak_gib = machine.peak_rss_bytes() / 2**30

    print(f"# {machine.describe()}")
    print("| preset | dtype | parameters | expected | build s | peak RSS GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {args.preset} | {args.dtype} | {params:,} | {expected:,} | {seconds:.1f} | "
          f"{peak_gib:.1f} |")
    if params != expected:
        raise SystemExit(f"parameter count {params:,} != expected {expected:,}")


if __name__ == "__main__":
    main()
