"""LoRA fine-tuning speed and memory of the full Gemma 2 2B (random weights) on CPU:
gemma-keras (TensorFlow with and without XLA, JAX; float32, mixed_bfloat16, an int8 base)
against transformers + PEFT and keras-hub's own `enable_lora`.

Every system trains LoRA rank 8 on the attention projections (q, k, v, o) with AdamW, on
random token ids, one (system, shape) per subprocess, one after another, under a time limit
and a resident-memory cap (the parent polls /proc and kills a child that passes either).
Each gemma-keras child builds the 2B with zero weights (`Gemma2CausalLM.empty`: values do not
change the speed, and Keras' random initializers would hold a second copy of each weight while
filling it, which would count in the peak), runs one step to compile, then times STEPS steps
and prints one JSON line; the parent prints a Markdown table: the median step, tokens/s, the
resident memory after the build, the peak resident memory and that peak over the float32
weights' bytes.

  flock /tmp/gemma_bench.lock .venv/bin/python benchmarks/finetune_2b.py
  .venv/bin/python benchmarks/finetune_2b.py --smoke                  # small config, quick
  .venv/bin/python benchmarks/finetune_2b.py --systems keras-tf,peft --shapes 1x128
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

import machine
from gemm_peak import step_flops
from gemma_keras.defaults import prefer_onednn
from generate_2b import gemma_config, keras_hub_causal_lm, run_capped

RANK, STEPS = 8, 3
SHAPES = ("1x128", "1x512", "4x128")  # batch x sequence length
# name: (backend, Keras dtype policy or torch dtype, XLA, int8 base, remat)
SYSTEMS = {
    "keras-tf": ("tensorflow", "float32", False, False, False),
    "keras-tf-xla": ("tensorflow", "float32", True, False, False),
    "keras-tf-bf16": ("tensorflow", "mixed_bfloat16", False, False, False),
    "keras-tf-int8": ("tensorflow", "float32", False, True, False),
    "keras-tf-xla-int8": ("tensorflow", "float32", True, True, False),
    "keras-tf-remat": ("tensorflow", "float32", False, False, True),
    "keras-tf-int8-remat": ("tensorflow", "float32", False, True, True),
    "keras-tf-remat-logits": ("tensorflow", "float32", False, False, True),
    "keras-jax": ("jax", "float32", True, False, False),
    "keras-jax-bf16": ("jax", "mixed_bfloat16", True, False, False),
    "keras-jax-remat": ("jax", "float32", True, False, True),
    "keras-jax-int8": ("jax", "float32", True, True, False),
    "keras-jax-int8-remat": ("jax", "float32", True, True, True),
    "peft": ("torch", "float32", False, False, False),
    "keras-hub": ("tensorflow", "float32", False, False, False),
}
# Compiled with Keras' loss on the full logits instead of the default chunked head loss
# (gemma_keras/head_loss.py), to measure what the chunks save.
KERAS_LOSS = ("keras-tf-remat-logits",)
# The default comparison: TensorFlow with and without XLA and JAX, float32 and mixed_bfloat16,
# the int8 base on JAX (the leanest), and the two peers.
DEFAULT_SYSTEMS = ("keras-tf", "keras-tf-xla", "keras-jax", "keras-tf-bf16", "keras-jax-bf16",
                   "keras-jax-int8", "peft", "keras-hub")


def batch_of(config, batch, seq):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, (batch, seq + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:], np.ones((batch, seq), np.float32)


def timed_steps(step, steps):
    """`(warmup_s, median_s)`: one compiling step, then `steps` timed ones."""
    t = time.perf_counter()
    step()
    warmup = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return warmup, float(np.median(times))


# ----------------------------------------------------------------------------- systems
def run_keras(system, batch, seq, smoke):
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.quantization import quantized_dtype, weight_bytes
    from gemma_keras.training import adamw, masked_accuracy, masked_lm_loss, remat_scope

    _, dtype, xla, int8, remat = SYSTEMS[system]
    config = gemma_config(smoke)
    t = time.perf_counter()
    policy = quantized_dtype("int8", dtype) if int8 else dtype
    if remat:
        with remat_scope(config):
            lm = Gemma2CausalLM.empty(config, dtype=policy)
    else:
        lm = Gemma2CausalLM.empty(config, dtype=policy)
    lm.enable_lora(RANK)
    keras_loss = (dict(loss=masked_lm_loss(), weighted_metrics=[masked_accuracy()])
                  if system in KERAS_LOSS else {})
    lm.compile(optimizer=adamw(lm), jit_compile=xla, **keras_loss)
    build = time.perf_counter() - t
    build_rss = machine.rss_bytes()
    ids, labels, weights = batch_of(config, batch, seq)
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    warmup, step = timed_steps(lambda: lm.train_on_batch(x, labels, weights), STEPS)
    return dict(build_s=build, build_rss=build_rss, warmup_s=warmup, step_s=step,
                weight_bytes=weight_bytes(lm))


def run_keras_hub(batch, seq, smoke):
    import keras

    config = gemma_config(smoke)
    t = time.perf_counter()
    lm = keras_hub_causal_lm(config)
    backbone = lm.backbone
    backbone.enable_lora(RANK, target_layer_names=["query", "key", "value",
                                                   "attention_output"])
    optimizer = keras.optimizers.AdamW(learning_rate=2e-4, weight_decay=0.01, clipnorm=1.0)
    lm.compile(optimizer=optimizer, jit_compile=False,
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    build = time.perf_counter() - t
    build_rss = machine.rss_bytes()
    ids, labels, weights = batch_of(config, batch, seq)
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    warmup, step = timed_steps(lambda: lm.train_on_batch(x, labels, weights), STEPS)
    return dict(build_s=build, build_rss=build_rss, warmup_s=warmup, step_s=step)


def run_peft(batch, seq, smoke):
    import peft
    import torch
    import transformers

    config = gemma_config(smoke)
    hf_config = transformers.Gemma2Config(**config.to_hf_dict(), attn_implementation="eager")
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device("meta"):
        model = transformers.Gemma2ForCausalLM(hf_config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.tie_weights()
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=RANK, lora_alpha=RANK, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=2e-4, weight_decay=0.01)
    build = time.perf_counter() - t
    build_rss = machine.rss_bytes()
    ids, _, _ = batch_of(config, batch, seq)
    ids = torch.from_numpy(ids.astype(np.int64))

    def step():
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmup, step_s = timed_steps(step, STEPS)
    return dict(build_s=build, build_rss=build_rss, warmup_s=warmup, step_s=step_s)


def child(system, shape, smoke):
    batch, seq = (int(n) for n in shape.split("x"))
    if system == "peft":
        result = run_peft(batch, seq, smoke)
    elif system == "keras-hub":
        result = run_keras_hub(batch, seq, smoke)
    else:
        result = run_keras(system, batch, seq, smoke)
    result["peak_rss"] = machine.peak_rss_bytes()
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------ parent
def run_child(system, shape, smoke, rss_cap, time_limit):
    """Run one (system, shape) in a subprocess; kill it past `rss_cap` bytes or
    `time_limit` seconds. Returns the child's result with `status`, `peak_rss`, `wall_s`."""
    env = {**os.environ, "KERAS_BACKEND": SYSTEMS[system][0], "TF_CPP_MIN_LOG_LEVEL": "2"}
    if SYSTEMS[system][0] == "torch":
        env["KERAS_BACKEND"] = "tensorflow"
    if system.startswith("keras-tf"):
        prefer_onednn(env)  # as `gemma-keras finetune` runs (keras-hub: TensorFlow's default)
    cmd = [sys.executable, __file__, "--child", system, "--shapes", shape]
    return run_capped(cmd + (["--smoke"] if smoke else []), rss_cap, time_limit, env)


def onednn_setting():
    """The TF_ENABLE_ONEDNN_OPTS the gemma-keras TensorFlow children run with."""
    env = dict(os.environ)
    prefer_onednn(env)
    return env["TF_ENABLE_ONEDNN_OPTS"]


def row(system, shape, result, float32_bytes, config):
    batch, seq = (int(n) for n in shape.split("x"))
    gflops = step_flops(config, batch, seq, SYSTEMS[system][4]) / 1e9
    rss = result["peak_rss"]
    build_rss = f"{result['build_rss'] / 2**30:.1f}" if result.get("build_rss") else "-"
    if result["status"] != "ok":
        return (f"| {system} | {shape} | - | - | - | {build_rss} | {rss / 2**30:.1f} "
                f"| {rss / float32_bytes:.2f} | - | {result['status']} after "
                f"{result['wall_s']:.0f} s |")
    return (f"| {system} | {shape} | {result['step_s']:.1f} | {batch * seq / result['step_s']:.1f} "
            f"| {gflops / result['step_s']:.0f} | {build_rss} | {rss / 2**30:.2f} | {rss / float32_bytes:.2f} "
            f"| {result['warmup_s']:.0f} | ok |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="a small config (a quick check)")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated, from {', '.join(SYSTEMS)} (or 'all')")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help="comma-separated BATCHxSEQUENCE (default: %(default)s)")
    parser.add_argument("--rss-cap-gib", type=float, default=20.0,
                        help="kill a system whose resident memory passes this (default 20)")
    parser.add_argument("--time-limit", type=float, default=1200.0,
                        help="seconds per system and shape (default 1200)")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.shapes, args.smoke)

    systems = list(SYSTEMS) if args.systems == "all" else args.systems.split(",")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    for system, package in (("peft", "peft"), ("keras-hub", "keras_hub")):
        if system in systems and importlib.util.find_spec(package) is None:
            parser.error(f"{system} needs the {package} package: "
                         "pip install -e '.[benchmark]'")
    params = gemma_config(args.smoke).num_parameters()
    float32_bytes = 4 * params
    print(f"# {machine.describe()}; {'smoke config' if args.smoke else 'Gemma 2 2B'} "
          f"({params:,} parameters, {float32_bytes / 2**30:.2f} GiB in float32); LoRA rank "
          f"{RANK} on q, k, v, o; AdamW; median of {STEPS} steps after one compiling step; GFLOPS = the step's FLOPs (gemm_peak.step_flops) over its time; "
          f"keras-tf* with TF_ENABLE_ONEDNN_OPTS={onednn_setting()}",
          flush=True)
    header = ("| system | batch x seq | step s | tokens/s | GFLOPS | RSS after build GiB | peak RSS GiB "
              "| peak / f32 weights | compile step s | status |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|", flush=True)
    for shape in args.shapes.split(","):
        for system in systems:
            result = run_child(system, shape, args.smoke, args.rss_cap_gib * 2**30,
                               args.time_limit)
            print(row(system, shape, result, float32_bytes, gemma_config(args.smoke)), flush=True)


if __name__ == "__main__":
    main()
