"""SavedModel for TensorFlow Serving at the 2B's size: export cost, files, and decode speed.

    flock /tmp/gemma_bench.lock .venv/bin/python benchmarks/saved_model_2b.py --layers 2 6

For each `--layers N`, the random Gemma 2 2B width with N of its 26 layers (float32) is
exported in one subprocess (`export_saved_model`, max_length 256), then loaded in a second
one that imports only tensorflow and tensorflow_text, and `serving_default` is timed on one
prompt at two `max_new_tokens`; their difference gives seconds per decode step. With two or
more depths, a line fitted through the per-step times estimates the full 26-layer model.
Memory: each subprocess holds N-layer weights (2.36 GB embedding + 0.31 GB per layer);
`--layers 26` needs about 11 GB free and is refused below `--min-free-gib`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The quick brown fox jumps over the lazy dog. " * 2


def _available_gib():
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20


def _peak_rss_gib():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def stage_export(layers, out):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import dataclasses

    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.config import Gemma2Config
    from gemma_keras.saved_model import export_saved_model

    tokenizer = Path(__file__).resolve().parents[1] / "gemma_keras/assets/tiny/tokenizer.model"
    config = Gemma2Config.preset("gemma2_2b")
    config = dataclasses.replace(config, num_hidden_layers=layers,
                                 layer_types=config.layer_types[:layers])
    t0 = time.perf_counter()
    model = Gemma2CausalLM(config, dtype="float32")
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    path = export_saved_model(model, out, version=1, tokenizer_path=tokenizer, max_length=256)
    seconds = time.perf_counter() - t0
    shards = sorted((path / "variables").glob("variables.data-*"))
    return {"build_s": built, "export_s": seconds,
            "saved_model_pb_mb": (path / "saved_model.pb").stat().st_size / 1e6,
            "variables_gb": sum(p.stat().st_size for p in shards) / 1e9,
            "shards": len(shards), "largest_shard_gb": max(p.stat().st_size for p in shards) / 1e9,
            "peak_rss_gib": _peak_rss_gib()}


def stage_serve(path, short, long):
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    t0 = time.perf_counter()
    model = tf.saved_model.load(str(path))
    load = time.perf_counter() - t0

    def run(n):
        t = time.perf_counter()
        out = model.generate(tf.constant([PROMPT]), max_new_tokens=tf.constant(n))
        steps = out["token_ids"].shape[1]
        return time.perf_counter() - t, steps

    first, _ = run(short)  # includes instantiating the graph
    t_short, n_short = run(short)
    t_long, n_long = run(long)
    return {"load_s": load, "first_call_s": first, "short_s": t_short, "long_s": t_long,
            "steps": [n_short, n_long],
            "s_per_token": (t_long - t_short) / max(n_long - n_short, 1),
            "peak_rss_gib": _peak_rss_gib()}


def _subprocess(args):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env=env, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"{args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", default="all", choices=("all", "export", "serve"))
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--out-dir", default="/tmp/gemma_saved_model_bench")
    parser.add_argument("--max-new", type=int, nargs=2, default=[4, 20])
    parser.add_argument("--min-free-gib", type=float, default=None)
    args = parser.parse_args()
    out_dir = Path(args.out_dir)

    if args.stage == "export":
        print(json.dumps(stage_export(args.layers[0], out_dir)))
        return
    if args.stage == "serve":
        print(json.dumps(stage_serve(out_dir / "1", *args.max_new)))
        return

    rows = []
    for layers in args.layers:
        need = args.min_free_gib or (2.4 + 0.32 * layers) * 1.3 + 1
        if _available_gib() < need:
            raise SystemExit(f"{layers} layers: need about {need:.1f} GiB free, "
                             f"{_available_gib():.1f} available")
        target = out_dir / f"layers_{layers}"
        shutil.rmtree(target, ignore_errors=True)
        try:
            exported = _subprocess(["export", "--layers", str(layers), "--out-dir", str(target)])
            served = _subprocess(["serve", "--out-dir", str(target),
                                  "--max-new", *map(str, args.max_new)])
        finally:
            shutil.rmtree(target, ignore_errors=True)
        rows.append({"layers": layers, **exported, **{f"serve_{k}": v for k, v in served.items()}})
        print(json.dumps(rows[-1]), flush=True)

    print("\n| layers | export s | saved_model.pb MB | variables GB | shards | load s | "
          "s/token | tokens/s | peak RSS GiB (export, serve) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['layers']} | {r['export_s']:.0f} | {r['saved_model_pb_mb']:.1f} | "
              f"{r['variables_gb']:.2f} | {r['shards']} | {r['serve_load_s']:.0f} | "
              f"{r['serve_s_per_token']:.3f} | {1 / r['serve_s_per_token']:.2f} | "
              f"{r['peak_rss_gib']:.1f}, {r['serve_peak_rss_gib']:.1f} |")
    if len(rows) >= 2:
        import numpy as np

        x = np.array([r["layers"] for r in rows], float)
        slope, intercept = np.polyfit(x, [r["serve_s_per_token"] for r in rows], 1)
        pb_slope, pb_intercept = np.polyfit(x, [r["saved_model_pb_mb"] for r in rows], 1)
        print(f"\nfitted to 26 layers: {intercept + 26 * slope:.2f} s/token "
              f"({1 / (intercept + 26 * slope):.2f} tokens/s), saved_model.pb "
              f"{pb_intercept + 26 * pb_slope:.1f} MB")


if __name__ == "__main__":
    main()
