"""Generation speed of the full Gemma 2 2B (random weights) on CPU: gemma-keras against
keras-hub and transformers, with the memory-bandwidth bound measured in the same run.

Each system runs in its own subprocess, one after another, under a time limit and a
resident-memory cap (the parent polls /proc and kills a child that exceeds either). Every
child builds the 2B with random weights, warms up on the same shapes (so compilation is
excluded), then generates NEW tokens after a PROMPT-token prompt, batch 1, and prints one
JSON line. The parent prints a Markdown table.

  flock /tmp/gemma_bench.lock .venv/bin/python benchmarks/generate_2b.py
  .venv/bin/python benchmarks/generate_2b.py --smoke           # a small config, quick check
  .venv/bin/python benchmarks/generate_2b.py --systems gemma-keras-float32,transformers-float32

There is no gemma-keras int8 row: Keras' `quantize("int8")` acts on `Dense` layers, and when
the projections were Dense it decoded 0.063 tokens/s here (int8 matmuls dequantized in the
step); compact weights pay off in the TFLite export (benchmarks/tflite_2b.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

import machine

PROMPT, NEW = 64, 64
SYSTEMS = {
    # name: (time limit s, new tokens (None = NEW), weight bytes per parameter)
    "gemma-keras-float32": (600, None, 4),
    "gemma-keras-bfloat16": (420, 8, 2),
    "keras-hub-float32": (480, None, 4),
    "transformers-float32": (420, None, 4),
    "transformers-bfloat16": (420, None, 2),
}
SMOKE_CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=512,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=64, query_pre_attn_scalar=64, sliding_window=32)


# ------------------------------------------------------------------ measurement helpers
def read_bandwidth(gib=2.0, repeats=5):
    """Streaming-read bandwidth in bytes/s: the best of `repeats` passes over a large float32
    array, read either by a BLAS matrix-vector product (NumPy's BLAS threads) or by
    `numpy.sum` on two threads, whichever is faster (the reduction alone is compute-bound
    on this CPU and underestimates the bandwidth)."""
    data = np.ones(int(gib * 2**30 // 4), np.float32)
    matrix, vector = data.reshape(-1, 4096), np.ones(4096, np.float32)
    halves = np.array_split(data, 2)

    def two_thread_sum():
        workers = [threading.Thread(target=np.sum, args=(h,)) for h in halves]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    best = 0.0
    for read in (lambda: matrix @ vector, two_thread_sum):
        for _ in range(repeats):
            t = time.perf_counter()
            read()
            best = max(best, data.nbytes / (time.perf_counter() - t))
    return best


def fast_random_initializers():
    """Make Keras' random initializers fill weights from a tiled block of random normals.

    Keras' own initializers take minutes for 2.6B values on 2 cores (the model benchmark
    measured a 152 s build); the speed measured here does not depend on the values, only
    on their being ordinary floats, so a 2^20 + 7 block of N(0, 0.02) values is repeated.
    """
    import keras
    from keras.src.initializers import random_initializers as ri

    from gemma_keras.converters.safetensors_io import numpy_dtype

    block = np.random.default_rng(0).standard_normal(2**20 + 7).astype(np.float32) * 0.02

    def fill(self, shape, dtype=None):
        # Tiled in the variable's own dtype: a float32 temporary of the 2B's embedding
        # (2.4 GB) would dominate a bfloat16 model's peak.
        dtype = keras.backend.standardize_dtype(dtype or "float32")
        values = np.resize(block.astype(numpy_dtype(dtype)), int(np.prod(shape)))
        return keras.ops.convert_to_tensor(values.reshape(shape), dtype=dtype)

    for cls in (ri.RandomNormal, ri.TruncatedNormal, ri.RandomUniform, ri.VarianceScaling):
        cls.__call__ = fill


def gemma_config(smoke):
    from gemma_keras.config import Gemma2Config

    return Gemma2Config(**SMOKE_CONFIG) if smoke else Gemma2Config.preset("gemma2_2b")


def prompt_ids(config):
    rng = np.random.default_rng(0)
    return [config.bos_token_id, *rng.integers(3, config.vocab_size, PROMPT - 1).tolist()]


# ----------------------------------------------------------------------------- systems
def run_gemma_keras(dtype, new, smoke):
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.generation import generate_ids

    config = gemma_config(smoke)
    fast_random_initializers()
    t = time.perf_counter()
    lm = Gemma2CausalLM(config, dtype=dtype)
    build = time.perf_counter() - t
    prompt = prompt_ids(config)

    def timed(max_new):
        times, t0 = [], time.perf_counter()
        for _ in generate_ids(lm, [prompt], max_new_tokens=max_new, stop_token_ids=()):
            times.append(time.perf_counter() - t0)
        return times

    t = time.perf_counter()
    timed(2)  # compiles the prefill chunk and the decode step at the measured shapes
    warmup = time.perf_counter() - t
    times = timed(new)
    return dict(build_s=build, warmup_s=warmup, prefill_s=times[0],
                decode_s=times[-1] - times[0], decode_tokens=len(times) - 1)


def keras_hub_causal_lm(config):
    """keras-hub 0.32's GemmaCausalLM configured as the Gemma 2 `config` (float32, random
    weights from `fast_random_initializers`, no preprocessor)."""
    import keras_hub

    fast_random_initializers()
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=config.vocab_size, num_layers=config.num_hidden_layers,
        num_query_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, hidden_dim=config.hidden_size,
        intermediate_dim=2 * config.intermediate_size, head_dim=config.head_dim,
        query_head_dim_normalize=config.query_pre_attn_scalar == config.head_dim,
        use_post_ffw_norm=True, use_post_attention_norm=True,
        attention_logit_soft_cap=config.attn_logit_softcapping,
        final_logit_soft_cap=config.final_logit_softcapping,
        use_sliding_window_attention=True, sliding_window_size=config.sliding_window,
        layer_norm_epsilon=config.rms_norm_eps, dtype="float32",
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def run_keras_hub(new, smoke):
    import tensorflow as tf

    config = gemma_config(smoke)
    t = time.perf_counter()
    lm = keras_hub_causal_lm(config)
    build = time.perf_counter() - t
    total = PROMPT + new
    token_ids = np.zeros((1, total), np.int32)
    token_ids[0, :PROMPT] = prompt_ids(config)
    mask = np.zeros((1, total), bool)
    mask[0, :PROMPT] = True
    inputs = {"token_ids": token_ids, "padding_mask": mask}

    t = time.perf_counter()
    lm.generate(inputs, stop_token_ids=None)  # traces keras-hub's generate function
    warmup = time.perf_counter() - t
    # keras-hub's prefill (the whole padded length in one pass), traced like its generate
    build_cache = tf.function(lm._build_cache)
    build_cache(token_ids)
    t = time.perf_counter()
    build_cache(token_ids)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    lm.generate(inputs, stop_token_ids=None)
    generate = time.perf_counter() - t
    return dict(build_s=build, warmup_s=warmup, prefill_s=prefill,
                decode_s=generate - prefill, decode_tokens=new - 1,
                params=lm.backbone.count_params())


def run_transformers(dtype, new, smoke):
    import torch
    import transformers

    config = gemma_config(smoke)
    hf_config = transformers.Gemma2Config(**config.to_hf_dict(), attn_implementation="eager")
    torch.manual_seed(0)
    t = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # parameters made in `dtype`, no copy
    try:
        with torch.device("meta"):
            model = transformers.Gemma2ForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.tie_weights()
    build = time.perf_counter() - t
    prompt = torch.tensor([prompt_ids(config)])

    def timed(max_new):
        times, t0 = [], time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=prompt, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
            for _ in range(max_new - 1):
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                times.append(time.perf_counter() - t0)
        return times

    t = time.perf_counter()
    timed(2)
    warmup = time.perf_counter() - t
    times = timed(new)
    return dict(build_s=build, warmup_s=warmup, prefill_s=times[0],
                decode_s=times[-1] - times[0], decode_tokens=len(times) - 1,
                params=sum(p.numel() for p in model.parameters()))


def child(system, smoke):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _, new, _ = SYSTEMS[system]
    new = NEW if new is None else new
    if system.startswith("gemma-keras"):
        result = run_gemma_keras(system.rsplit("-", 1)[1], new, smoke)
    elif system.startswith("keras-hub"):
        result = run_keras_hub(new, smoke)
    else:
        result = run_transformers(system.rsplit("-", 1)[1], new, smoke)
    result["peak_rss"] = machine.peak_rss_bytes()
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------ parent
def run_capped(cmd, rss_cap, time_limit, env=None):
    """Run `cmd` (a benchmark child that prints one `RESULT {json}` line), killing it past
    `rss_cap` bytes resident or `time_limit` seconds. Returns its result with `status`
    ("ok", or why it was killed or failed), `peak_rss` and `wall_s`."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = [], []
    readers = [threading.Thread(target=lambda s=s, o=o: o.extend(s), daemon=True)
               for s, o in ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()
    start, peak, status = time.perf_counter(), 0, None
    while proc.poll() is None:
        peak = max(peak, machine.rss_bytes(proc.pid))
        if peak > rss_cap:
            status = f"killed: resident memory passed the {rss_cap / 2**30:.0f} GiB cap"
        elif time.perf_counter() - start > time_limit:
            status = f"killed: over the {time_limit:.0f} s time limit"
        if status:
            proc.kill()
            break
        time.sleep(0.2)
    proc.wait()
    for reader in readers:
        reader.join(5)
    lines = [line for line in out if line.startswith("RESULT ")]
    if lines and not status:
        result = {**json.loads(lines[-1][7:]), "status": "ok"}
    else:
        tail = "".join(err[-3:]).strip().replace("\n", " | ")[-300:]
        result = {"status": status or f"failed (exit {proc.returncode}): {tail}"}
    result["wall_s"] = time.perf_counter() - start
    result["peak_rss"] = max(result.get("peak_rss", 0), peak)
    return result


def run_system(system, smoke, rss_cap):
    cmd = [sys.executable, __file__, "--child", system] + (["--smoke"] if smoke else [])
    return run_capped(cmd, rss_cap, SYSTEMS[system][0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="a small config (a quick check)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated, from {', '.join(SYSTEMS)}")
    parser.add_argument("--rss-cap-gib", type=float, default=18.0,
                        help="kill a system whose resident memory passes this (default 18)")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.smoke)

    systems = args.systems.split(",")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    params = gemma_config(args.smoke).num_parameters()
    bandwidth = read_bandwidth(0.25 if args.smoke else 2.0)
    print(f"# {machine.describe()}; "
          f"{'smoke config' if args.smoke else 'Gemma 2 2B'} ({params:,} parameters), "
          f"prompt {PROMPT} tokens, batch 1; streaming read {bandwidth / 1e9:.1f} GB/s",
          flush=True)
    header = ("| system | new tokens | prefill tok/s | decode tok/s | bound tok/s | of bound "
              "| peak RSS GB | RSS / weights | warmup s | status |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for system in systems:
        result = run_system(system, args.smoke, args.rss_cap_gib * 2**30)
        weight_bytes = params * SYSTEMS[system][2]
        bound = bandwidth / weight_bytes
        rss = result["peak_rss"] / 1e9
        if result["status"] == "ok":
            prefill = PROMPT / result["prefill_s"]
            decode = result["decode_tokens"] / result["decode_s"]
            cells = [str(result["decode_tokens"] + 1), f"{prefill:.2f}", f"{decode:.3f}",
                     f"{bound:.2f}", f"{decode / bound:.0%}", f"{rss:.1f}",
                     f"{result['peak_rss'] / weight_bytes:.2f}", f"{result['warmup_s']:.0f}",
                     "ok"]
        else:
            cells = ["-", "-", "-", f"{bound:.2f}", "-", f"{rss:.1f}", "-", "-",
                     result["status"] + f" after {result['wall_s']:.0f} s"]
        print(f"| {system} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
