"""SavedModel for TensorFlow Serving at the 2B's size: export, load, decode speed and
throughput under concurrent clients, beside `Gemma2CausalLM.generate` in the same run.

    flock /tmp/gemma_bench.lock .venv/bin/python benchmarks/saved_model_2b.py
    .venv/bin/python benchmarks/saved_model_2b.py --layers 1 --variants plain --clients 1 2

The random Gemma 2 2B (`--layers` of its 26 layers; float32, and bfloat16 when the CPU has
native bfloat16 and `--dtypes` asks for it) is exported once per variant, each in its own
subprocess: `plain` (core TensorFlow ops), `xla` (XLA-compiled prefill and decode step),
`batch` (in-graph batching, a `BatchFunction` op: max batch 8, 20 ms timeout) and
`xla+batch`. A second subprocess loads the export in a TF1 session as TensorFlow Serving
does (`gemma_keras.serving.session`), warms it up at every measured shape (so XLA compiles
and TensorFlow's first-run costs are excluded), then measures seconds per decode token at one
client (two `max_new_tokens`, their difference) and tokens/s with 1, 4 and 8 client threads
each sending one request at once (`gemma_keras.serving.load`). `keras` is `generate` on the
same random model (XLA), in its own subprocess. One subprocess holds the weights at a time
(about 11 GB in float32 at 26 layers).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import machine

PROMPT = "The quick brown fox jumps over the lazy dog. " * 2
VARIANTS = ("plain", "xla", "batch", "xla+batch")
TOKENIZER = Path(__file__).resolve().parents[1] / "gemma_keras/assets/tiny/tokenizer.model"


def _peak_rss_gib():
    return machine.peak_rss_bytes() / 2**30


def _available_gib():
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20


def _config(layers):
    from gemma_keras.config import Gemma2Config

    config = Gemma2Config.preset("gemma2_2b")
    return dataclasses.replace(config, num_hidden_layers=layers,
                               layer_types=config.layer_types[:layers])


def _model(layers, dtype):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from generate_2b import fast_random_initializers

    from gemma_keras.causal_lm import Gemma2CausalLM

    fast_random_initializers()
    return Gemma2CausalLM(_config(layers), dtype=dtype)


def _seconds_per_token(run, short, long):
    """Seconds per decode token: `run(n)` (a generation of at most n new tokens, returning
    how many it made) at two lengths, their difference. Also the share of the two CPU cores'
    time the process got meanwhile (other jobs on the machine lower it) and the load."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    n_short = run(short)
    t1 = time.perf_counter()
    n_long = run(long)
    t2 = time.perf_counter()
    if (n_short, n_long) != (short, long):  # a stop token: the difference would mislead
        raise SystemExit(f"generations of {short} and {long} new tokens made {n_short} and "
                         f"{n_long}")
    return {"s_per_token": ((t2 - t1) - (t1 - t0)) / (long - short),
            "cpu_share": (time.process_time() - cpu0) / (t2 - t0) / os.cpu_count(),
            "load": os.getloadavg()[0]}


# ---------------------------------------------------------------------------- stages
def stage_export(args):
    from gemma_keras.saved_model import export_saved_model
    from gemma_keras.serving.batching import InGraphBatching

    model = _model(args.layers, args.dtype)
    batching = InGraphBatching(max_batch_size=8, batch_timeout_micros=20_000,
                               allowed_batch_sizes=(1, 2, 4, 8))
    t0 = time.perf_counter()
    path = export_saved_model(model, args.out_dir, version=1, tokenizer_path=TOKENIZER,
                              max_length=256, max_new_tokens=16,
                              in_graph_batching=batching if "batch" in args.variant else None,
                              xla="xla" in args.variant)
    seconds = time.perf_counter() - t0
    shards = sorted((path / "variables").glob("variables.data-*"))
    return {"export_s": seconds, "variables_gb": sum(p.stat().st_size for p in shards) / 1e9,
            "saved_model_pb_mb": (path / "saved_model.pb").stat().st_size / 1e6,
            "export_peak_rss_gib": _peak_rss_gib()}


def _request(max_new):
    return {"prompts": np.array([PROMPT.encode()], object),
            "max_new_tokens": np.array([max_new], np.int32),
            "temperature": np.zeros([1], np.float32), "top_k": np.zeros([1], np.int32),
            "top_p": np.ones([1], np.float32), "seed": np.zeros([1], np.int64)}


def stage_serve(args):
    from gemma_keras.serving.load import run_load
    from gemma_keras.serving.session import ServingSession

    t0 = time.perf_counter()
    served = ServingSession(Path(args.out_dir) / "1")
    load = time.perf_counter() - t0

    def generate(feeds):
        return served.run("serving_default", feeds)

    short, long = args.max_new
    t0 = time.perf_counter()
    # Every batch size (in-graph batching pads to 1, 2, 4 or 8) at the measured cache size.
    for clients in args.clients * 2 if "batch" in args.variant else [1]:
        run_load(generate, [_request(short)] * clients, clients)
    warmup = time.perf_counter() - t0

    result = {"load_s": load, "warmup_s": warmup,
              **_seconds_per_token(lambda n: generate(_request(n))["token_ids"].shape[1],
                                   short, long)}
    for clients in args.clients:
        run = run_load(generate, [_request(long)] * clients, clients)
        if any(run.errors):
            raise SystemExit(f"{clients} clients: {[e for e in run.errors if e]}")
        summary = run.summary([o["token_ids"].shape[1] for o in run.outputs])
        result[f"tokens_per_s_{clients}"] = summary["tokens_per_s"]
        result[f"p99_s_{clients}"] = summary["p99_s"]
    result["serve_peak_rss_gib"] = _peak_rss_gib()
    return result


def stage_keras(args):
    from gemma_keras.generation import generate_ids
    from gemma_keras.tokenizer import GemmaTokenizer

    t0 = time.perf_counter()
    model = _model(args.layers, args.dtype)
    build = time.perf_counter() - t0
    prompt = GemmaTokenizer(TOKENIZER).encode(PROMPT)  # the served model's prompt ids

    def run(n):
        return sum(1 for _ in generate_ids(model, [prompt], max_new_tokens=n,
                                           stop_token_ids=()))

    short, long = args.max_new
    run(short)  # compiles
    return {"build_s": build, **_seconds_per_token(run, short, long),
            "keras_peak_rss_gib": _peak_rss_gib()}


STAGES = {"export": stage_export, "serve": stage_serve, "keras": stage_keras}


# ---------------------------------------------------------------------------- parent
def _share(result):
    return f"{result['cpu_share']:.0%}, {result['load']:.1f}"


def _subprocess(stage, args, **overrides):
    argv = [sys.executable, __file__, "--stage", stage, "--layers", str(args.layers),
            "--dtype", overrides.get("dtype", args.dtype), "--out-dir", str(args.out_dir),
            "--variant", overrides.get("variant", "plain"),
            "--max-new", *map(str, args.max_new), "--clients", *map(str, args.clients)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"{stage} {overrides} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=("float32", "bfloat16"),
                        help="bfloat16 runs only on CPUs with native bfloat16")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-new", type=int, nargs=2, default=[4, 12],
                        help="short and long max_new_tokens (seconds/token is their difference; "
                             "throughput uses the long one)")
    parser.add_argument("--no-keras", action="store_true", help="skip the generate row")
    parser.add_argument("--out-dir", default="/tmp/gemma_saved_model_bench")
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(STAGES[args.stage](args)))
        return

    dtypes = [d for d in args.dtypes if d == "float32" or machine.has_native_bfloat16()]
    skipped = sorted(set(args.dtypes) - set(dtypes))
    weights_gb = _config(args.layers).num_parameters() * 4 / 1e9
    print(f"# {machine.describe()}; Gemma 2 2B width, {args.layers} layers, random weights "
          f"({weights_gb:.1f} GB in float32); one prompt of {len(PROMPT.split())} words per "
          f"request, greedy, max_new_tokens {args.max_new[1]}"
          + (f"; skipped {skipped} (no native bfloat16 on this CPU)" if skipped else ""),
          flush=True)
    cols = [f"tok/s {c} client{'s' * (c > 1)}" for c in args.clients]
    print("| dtype | runtime | export s | export peak GiB | load s | s/token (1 client) | "
          + " | ".join(cols) + f" | {args.clients[-1]} vs 1 | p99 s at {args.clients[-1]} | "
          "serve peak GiB | peak / weights | CPU share, load (s/token) |")
    print("|---" * (11 + len(cols)) + "|")
    for dtype in dtypes:
        weights = weights_gb * (4 if dtype == "float32" else 2) / 4 * 1e9 / 2**30  # GiB
        if _available_gib() < weights * 1.4 + 1:
            raise SystemExit(f"need about {weights * 1.4 + 1:.1f} GiB free, "
                             f"{_available_gib():.1f} available")
        if not args.no_keras:
            k = _subprocess("keras", args, dtype=dtype)
            print(f"| {dtype} | Gemma2CausalLM.generate (XLA) | - | - | {k['build_s']:.0f} "
                  f"(build) | {k['s_per_token']:.3f} | " + " | ".join("-" for _ in cols)
                  + f" | - | - | {k['keras_peak_rss_gib']:.1f} | "
                  f"{k['keras_peak_rss_gib'] / weights:.2f} | {_share(k)} |", flush=True)
        for variant in args.variants:
            shutil.rmtree(args.out_dir, ignore_errors=True)
            try:
                e = _subprocess("export", args, dtype=dtype, variant=variant)
                s = _subprocess("serve", args, dtype=dtype, variant=variant)
            finally:
                shutil.rmtree(args.out_dir, ignore_errors=True)
            speeds = [s[f"tokens_per_s_{c}"] for c in args.clients]
            print(f"| {dtype} | SavedModel {variant} | {e['export_s']:.0f} | "
                  f"{e['export_peak_rss_gib']:.1f} | {s['load_s']:.0f} | "
                  f"{s['s_per_token']:.3f} | " + " | ".join(f"{v:.2f}" for v in speeds)
                  + f" | {speeds[-1] / speeds[0]:.2f}x | {s[f'p99_s_{args.clients[-1]}']:.1f} | "
                  f"{s['serve_peak_rss_gib']:.1f} | {s['serve_peak_rss_gib'] / weights:.2f} | "
                  f"{_share(s)} |", flush=True)


if __name__ == "__main__":
    main()
