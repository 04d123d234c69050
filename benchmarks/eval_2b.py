"""Scoring throughput of the full Gemma 2 2B (random weights, float32): gemma-keras against
transformers, and the TFLite int8 / int4 files beside them.

    flock /tmp/gemma_bench.lock .venv/bin/python benchmarks/eval_2b.py \
        [--tflite int8.tflite int4.tflite] [--layers N]

Each system runs in its own subprocess (so each has its own memory), one after the other,
on the same 4 documents of 512 random tokens (`<bos>` first), and computes what perplexity
needs: the log-probability of every token after the first, summed in float64.

  keras         `gemma_keras.evaluation.scorers.KerasScorer` on the random 2B
                (`tflite_2b.random_causal_lm`): one forward pass per batch (default batch
                size from `gemma_keras.defaults.eval_batch_size`: 1 for the 2B at 512 tokens,
                so that the logits stay within 512 MiB); once per --keras-backends entry:
                `tensorflow` (TensorFlow's own default: on AMD CPUs its oneDNN ops are off
                and a float32 matmul is Eigen's), `tensorflow-onednn`
                (TF_ENABLE_ONEDNN_OPTS=1), `jax`.
  transformers  `Gemma2ForCausalLM` float32 (torch, its default attention), one forward pass
                per document, log-softmax and gather in float32, sum in float64.
  tflite        `GemmaTFLite.logits_at_every_position` through the file's score_<T>
                signatures (export with `--score-lens`), XNNPACK, 2 threads.

  gemm          (--gemm) the float32 matrix product alone at the MLP's shape, [512, 2304] x
                [2304, 9216] as `x @ w.T` with w [out, in], best of 5, 2 threads: NumPy,
                torch, TensorFlow (Eigen and oneDNN), JAX: the most the systems above can
                reach on this CPU.

Tokens/s counts the 512 tokens of each document run through the model; GFLOPS is tokens/s
times the model's float operations per token (`flop_per_token`: 2 per weight of every
matrix product, head included, plus attention's scores and weighted sums). `--layers N`
builds the 2B's width with N of its 26 layers (a dry run). Prints a Markdown table headed by
`machine.describe()`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import machine  # noqa: E402  (benchmarks run as scripts)

DOCUMENTS, LENGTH = 4, 512


def documents(vocab_size):
    import numpy as np

    rng = np.random.default_rng(0)
    return [[2, *rng.integers(110, vocab_size, LENGTH - 1).tolist()] for _ in range(DOCUMENTS)]


def config(layers, small=False, vocab=None):
    from gemma_keras.config import Gemma2Config

    if small:  # a dry run of the script
        import tflite_2b

        return Gemma2Config(**tflite_2b.SMALL)
    cfg = Gemma2Config.preset("gemma2_2b")
    if layers or vocab:
        cfg = Gemma2Config(**{**cfg.to_dict(), "num_hidden_layers": layers or
                              cfg.num_hidden_layers, "layer_types": None,
                              "vocab_size": vocab or cfg.vocab_size})
    return cfg


def flop_per_token(cfg, length=LENGTH):
    """Float operations per scored token of a `length`-token document: 2 per weight of every
    matrix product (projections, MLP, the tied head) and 4 * heads * head_dim per attended
    position (scores and weighted sum), averaged over the document's positions."""
    hidden, heads, kv, dim = (cfg.hidden_size, cfg.num_attention_heads,
                              cfg.num_key_value_heads, cfg.head_dim)
    per_layer = hidden * (heads + 2 * kv) * dim + heads * dim * hidden \
        + 3 * hidden * cfg.intermediate_size
    attended = min((length + 1) / 2, cfg.sliding_window or length)
    return (2 * (cfg.num_hidden_layers * per_layer + hidden * cfg.vocab_size)
            + cfg.num_hidden_layers * 4 * heads * dim * attended)


GEMM_SHAPE = (512, 2304, 9216)  # tokens, hidden, intermediate: the MLP's up projection


def stage_gemm(args):
    """GFLOPS of `x @ w.T` at GEMM_SHAPE in one library (best of 5 after a warm-up)."""
    import numpy as np

    m, k, n = GEMM_SHAPE
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    if args.library == "numpy":
        run = lambda: x @ w.T  # noqa: E731
    elif args.library == "torch":
        import torch

        torch.set_num_threads(2)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        run = lambda: torch.nn.functional.linear(tx, tw)  # noqa: E731
    elif args.library.startswith("tensorflow"):
        import tensorflow as tf

        tx, tw = tf.constant(x), tf.constant(w)
        run = lambda: tf.matmul(tx, tw, transpose_b=True).numpy()  # noqa: E731
    else:
        import jax
        import jax.numpy as jnp

        jx, jw = jnp.asarray(x), jnp.asarray(w)
        product = jax.jit(lambda a, b: a @ b.T)
        run = lambda: product(jx, jw).block_until_ready()  # noqa: E731
    from gemm_peak import best_seconds

    return {"gflops": 2 * m * k * n / best_seconds(run) / 1e9}


def timed(score, docs, warmup_tokens):
    """(seconds, total log-likelihood) of `score(docs)`, after a warm-up on the first
    `warmup_tokens` of the first document."""
    score([docs[0][:warmup_tokens]])
    start = time.perf_counter()
    total = score(docs)
    return time.perf_counter() - start, total


def stage_keras(args):
    import tflite_2b

    from gemma_keras import defaults
    from gemma_keras.evaluation.scorers import KerasScorer, score_tails
    from gemma_keras.tokenizer import GemmaTokenizer

    if args.hf:
        from gemma_keras.causal_lm import Gemma2CausalLM

        model = Gemma2CausalLM.from_pretrained(args.hf, dtype="float32")
        cfg = model.config
    else:
        cfg = config(args.layers, args.small, args.vocab)
        model = tflite_2b.random_causal_lm(cfg)
        model.tokenizer = GemmaTokenizer(tflite_2b.padded_tokenizer(
            cfg.vocab_size, Path(args.work) / "tokenizer.model"))
    batch = defaults.eval_batch_size(args.batch_size, LENGTH, cfg.vocab_size)
    scorer = KerasScorer(model, batch_size=batch)

    def score(docs):
        return sum(float(t.log_probs.sum()) for t in score_tails(scorer, docs,
                                                                 [len(d) - 1 for d in docs]))
    return {"batch": batch, **_result(score, documents(cfg.vocab_size), args)}


def stage_transformers(args):
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    if args.hf:
        model = Gemma2ForCausalLM.from_pretrained(args.hf, dtype=torch.float32).eval()
        return _transformers_result(model, model.config.vocab_size, args)
    cfg = config(args.layers, args.small, args.vocab)
    hf = Gemma2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                      intermediate_size=cfg.intermediate_size,
                      num_hidden_layers=cfg.num_hidden_layers,
                      num_attention_heads=cfg.num_attention_heads,
                      num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                      query_pre_attn_scalar=cfg.query_pre_attn_scalar,
                      sliding_window=cfg.sliding_window,
                      max_position_embeddings=cfg.max_position_embeddings)
    torch.manual_seed(0)
    return _transformers_result(Gemma2ForCausalLM(hf).eval(), cfg.vocab_size, args)


def _transformers_result(model, vocab_size, args):
    import torch

    def score(docs):
        total = 0.0
        with torch.no_grad():
            for doc in docs:
                ids = torch.tensor([doc])
                logits = model(input_ids=ids).logits[0, :-1]
                picked = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])
                total += float(picked.double().sum())
        return total
    return {"batch": 1, "threads": torch.get_num_threads(),
            **_result(score, documents(vocab_size), args)}


def stage_tflite(args):
    from gemma_keras.tflite import GemmaTFLite
    from gemma_keras.evaluation.scorers import TFLiteScorer, score_tails

    # no XNNPACK weight cache file beside the export (as large as the file; load is untimed)
    runtime = GemmaTFLite(args.file, args.tokenizer, num_threads=2, weight_cache=False)
    scorer = TFLiteScorer(runtime)

    def score(docs):
        return sum(float(t.log_probs.sum()) for t in score_tails(scorer, docs,
                                                                 [len(d) - 1 for d in docs]))
    return {"batch": 1, "file_gb": os.path.getsize(args.file) / 1e9,
            **_result(score, documents(runtime.vocab_size), args)}


def _result(score, docs, args):
    seconds, total = timed(score, docs, args.warmup_tokens)
    tokens = sum(len(d) for d in docs)
    return {"seconds": seconds, "tokens_per_s": tokens / seconds,
            "nll": -total / sum(len(d) - 1 for d in docs), "peak_rss_gib": machine.peak_rss_bytes() / 2**30}


STAGES = {"keras": stage_keras, "transformers": stage_transformers, "tflite": stage_tflite,
          "gemm": stage_gemm}
# --keras-backends entries: (KERAS_BACKEND, TF_ENABLE_ONEDNN_OPTS)
KERAS_SYSTEMS = {"tensorflow": ("tensorflow", "0"), "tensorflow-onednn": ("tensorflow", "1"),
                 "jax": ("jax", "0")}
GEMM_LIBRARIES = {"numpy": {}, "torch": {}, "tensorflow": {"TF_ENABLE_ONEDNN_OPTS": "0"},
                  "tensorflow-onednn": {"TF_ENABLE_ONEDNN_OPTS": "1"}, "jax": {}}


def run_stage(argv, timeout=1500, env=None):
    """Run one stage in a subprocess; its JSON result, or {"error": ...}."""
    try:
        proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True,
                              text=True, timeout=timeout, cwd=Path(__file__).parent,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1][len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=sorted(STAGES), default=None,
                        help="run one system in this process (the driver runs them all)")
    parser.add_argument("--tflite", nargs="*", default=[], metavar="FILE",
                        help=".tflite exports of the random 2B with score_<T> signatures")
    parser.add_argument("--file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.model for the .tflite files (default: beside them)")
    parser.add_argument("--hf", default=None, metavar="DIR",
                        help="load this Hugging Face checkpoint (float32) in gemma-keras and "
                             "transformers instead of random weights: the same weights in "
                             "every row (e.g. /tmp/w15/hf2b/hf, and .tflite files exported "
                             "from it)")
    parser.add_argument("--warmup-tokens", type=int, default=LENGTH,
                        help="warm up on this many tokens of the first document (default a "
                             "whole one: JAX compiles per shape)")
    parser.add_argument("--layers", type=int, default=None,
                        help="the 2B's width with this many layers (a dry run)")
    parser.add_argument("--small", action="store_true", help="a tiny config (a dry run)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="another vocabulary size (with --layers: a small proxy)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="gemma-keras windows per forward pass (default: the package's)")
    parser.add_argument("--keras-backends", default="tensorflow,tensorflow-onednn,jax",
                        help=f"gemma-keras systems, of {', '.join(KERAS_SYSTEMS)} (default all)")
    parser.add_argument("--no-transformers", action="store_true",
                        help="skip transformers (its row is the ratios' base)")
    parser.add_argument("--gemm", action="store_true",
                        help="also measure each library's float32 GEMM at the MLP's shape")
    parser.add_argument("--library", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default="/tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print("RESULT " + json.dumps(STAGES[args.stage](args)), flush=True)
        return
    common = [*(["--hf", args.hf] if args.hf else []),
              "--warmup-tokens", str(args.warmup_tokens),
              *(["--layers", str(args.layers)] if args.layers else []),
              *(["--small"] if args.small else []),
              *(["--vocab", str(args.vocab)] if args.vocab else []),
              *(["--batch-size", str(args.batch_size)] if args.batch_size else [])]
    head = machine.describe()
    results = {}
    for system in filter(None, args.keras_backends.split(",")):
        if system not in KERAS_SYSTEMS:
            parser.error(f"--keras-backends: {system!r} is not one of {', '.join(KERAS_SYSTEMS)}")
        backend, onednn = KERAS_SYSTEMS[system]
        results[f"gemma-keras ({system})"] = run_stage(
            ["--stage", "keras", *common],
            env={"KERAS_BACKEND": backend, "TF_ENABLE_ONEDNN_OPTS": onednn})
        print(f"{system}: {results[f'gemma-keras ({system})']}", file=sys.stderr, flush=True)
    if not args.no_transformers:
        results["transformers"] = run_stage(["--stage", "transformers", *common])
        print(f"transformers: {results['transformers']}", file=sys.stderr, flush=True)
    for path in args.tflite:
        extra = ["--tokenizer", args.tokenizer] if args.tokenizer else []
        results[f"tflite {Path(path).name}"] = run_stage(
            ["--stage", "tflite", "--file", path, "--warmup-tokens", str(args.warmup_tokens),
             *extra])
        print(f"{path}: {results[f'tflite {Path(path).name}']}", file=sys.stderr, flush=True)
    gemm = {lib: run_stage(["--stage", "gemm", "--library", lib], env=env)
            for lib, env in GEMM_LIBRARIES.items()} if args.gemm else {}
    if args.hf:
        from gemma_keras.config import Gemma2Config

        flop = flop_per_token(Gemma2Config.from_json_file(Path(args.hf) / "config.json"))
    else:
        flop = flop_per_token(config(args.layers, args.small, args.vocab))
    what = (f"{args.hf} (float32)" if args.hf else "small dry-run config" if args.small
            else "Gemma 2 2B" if not args.layers else f"2B width, {args.layers} of 26 layers")
    if args.vocab:
        what += f", vocabulary {args.vocab}"
    print(f"{head}\n\n{what}, random weights, float32; {DOCUMENTS} documents of {LENGTH} "
          f"tokens (warm-up: {args.warmup_tokens} tokens); scoring = log-probability of "
          "every token after <bos>\n")
    print("| system | batch | seconds | tokens/s | vs transformers | GFLOPS | nll | "
          "peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|")
    base = results.get("transformers", {}).get("tokens_per_s")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | - | - | - | - | - | - | {r['error']} |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        gflops = f"{r['tokens_per_s'] * flop / 1e9:.1f}" if "tflite" not in name else \
            "(int weights)"
        print(f"| {name} | {r['batch']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{ratio} | {gflops} | {r['nll']:.3f} | {r['peak_rss_gib']:.1f} |")
    print(f"\n{flop / 1e9:.2f} GFLOP per token")
    if gemm:
        m, k, n = GEMM_SHAPE
        print(f"\nfloat32 GEMM alone, [{m}, {k}] x [{k}, {n}] (x @ w.T), best of 5, GFLOPS: "
              + ", ".join(f"{lib} {r['gflops']:.1f}" if "gflops" in r else f"{lib} {r['error']}"
                          for lib, r in gemm.items()))


if __name__ == "__main__":
    main()
