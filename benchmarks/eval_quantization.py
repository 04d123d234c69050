"""What each TFLite quantization costs, measured with gemma_keras.evaluation.

    .venv/bin/python benchmarks/eval_quantization.py                 # the bundled tiny model
    flock /tmp/gemma_bench.lock .venv/bin/python benchmarks/eval_quantization.py --layers 2

Without --layers: the bundled tiny model (trained on "reverse: <words>" in Gemma's chat
format) is exported in every mode with a score signature; each file is scored against the
Keras float32 model on 100 held-out chat exchanges (prompt and answer as one document):
perplexity, KL divergence (mean, p99), top-1 agreement; and its task accuracy (greedy exact
match on the 200 held-out prompts, `gemma_keras.tiny_task`).

With --layers N: a random model of the Gemma 2 2B's width (vocabulary 256000, hidden 2304,
the 2B's attention and MLP shapes) with N of its 26 layers, exported in --modes; KL and
top-1 only on random token sequences (random weights have no meaningful perplexity).

With --hf DIR: the same on a Hugging Face checkpoint (the random full-size 2B,
/tmp/w15/hf2b/hf): the float32 Keras model built from DIR scores the sequences first
(10.5 GB at 2B) and its logits are cached in --work (1 GB at 2B, reused by the next run, so
the modes can be split over several runs), then each mode in turn is exported from DIR by the
lean route (streamed from its safetensors, under 2 GiB), scored and deleted (--keep keeps
it; a file already in --work is used and kept), so that one export at a time is on disk.

    flock /tmp/gemma_bench.lock .venv/bin/python benchmarks/eval_quantization.py \
        --hf /tmp/w15/hf2b/hf --work /tmp/h2/q

Prints one Markdown table, headed by `machine.describe()`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import machine  # noqa: E402  (benchmarks run as scripts)

CACHE_LEN, PREFILL_LENS, SCORE_LEN = 64, (8, 32), 32


def answer_perplexity(scorer, documents, answers):
    """Perplexity of the answers only (each document ends with its answer): the tiny model
    was trained on the answers, its prompts are random words."""
    import math

    from gemma_keras.evaluation.scorers import score_tails

    tokenizer = scorer.tokenizer
    sequences = [tokenizer.encode(d.text) for d in documents]
    counts = [len(tokenizer.encode(a, add_bos=False)) for a in answers]
    tails = score_tails(scorer, sequences, counts)
    return math.exp(-math.fsum(t.log_probs.sum() for t in tails) / sum(counts))


def tiny_documents(n=100):
    """Held-out chat exchanges of the tiny task as Documents (the model's own format), and
    their answers (`<end_of_turn>` included)."""
    from gemma_keras import tiny_task
    from gemma_keras.evaluation.data import Document
    from gemma_keras.tokenizer import END_OF_TURN

    examples = tiny_task.eval_examples()[:n]
    from gemma_keras.tokenizer import GemmaTokenizer

    tokenizer = GemmaTokenizer(Path(tiny_task.tiny_model_dir()) / "tokenizer.model")
    prompts = tiny_task.chat_prompts(tokenizer, [e["prompt"] for e in examples])
    answers = [e["response"] + END_OF_TURN for e in examples]
    return [Document(p + a, f"eval.jsonl:{i + 1}")
            for i, (p, a) in enumerate(zip(prompts, answers))], answers


def tiny_rows(modes, work):
    from gemma_keras import tiny_task
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.evaluation.agreement import agreement
    from gemma_keras.evaluation.perplexity import perplexity
    from gemma_keras.evaluation.scorers import KerasScorer, TFLiteScorer
    from gemma_keras.tflite import GemmaTFLite
    from gemma_keras.tflite.export import export_tflite_variants

    from gemma_keras.tflite.quantize import check_block_sizes

    model = Gemma2CausalLM.from_pretrained(tiny_task.tiny_model_dir(), dtype="float32")
    tokenizer = str(Path(tiny_task.tiny_model_dir()) / "tokenizer.model")
    skipped = []
    for mode in list(modes):
        try:
            check_block_sizes(model.config, mode)
        except ValueError:  # blocks wider than the tiny model's rows
            modes.remove(mode)
            skipped.append(mode)
    files = export_tflite_variants(model, {m: work / f"tiny_{m}.tflite" for m in modes},
                                   kv_cache_max_len=CACHE_LEN, prefill_lens=PREFILL_LENS,
                                   score_lens=(SCORE_LEN,), progress=False)
    (documents, answers), examples = tiny_documents(), tiny_task.eval_examples()
    reference = KerasScorer(model, batch_size=32, name="keras float32")
    float_ppl = perplexity(reference, documents, context=CACHE_LEN)["perplexity"]
    accuracy = tiny_task.exact_match_accuracy(
        lambda prompts: tiny_task.keras_answers(model, prompts), examples)
    rows = [("Keras float32", "-", f"{float_ppl:.2f}",
             f"{answer_perplexity(reference, documents, answers):.4f}", "0", "0", "100%",
             f"{accuracy:.1%}")]
    for mode in modes:
        runtime = GemmaTFLite(files[mode], tokenizer, weight_cache=False)
        scorer = TFLiteScorer(runtime, mode)
        report = agreement(scorer, reference, documents, context=CACHE_LEN)
        accuracy = tiny_task.exact_match_accuracy(
            lambda prompts: [runtime.chat([{"role": "user", "content": p}],
                                          max_new_tokens=tiny_task.MAX_NEW_TOKENS)
                             for p in prompts], examples)
        rows.append((mode, f"{files[mode].stat().st_size / 1e6:.2f}",
                     f"{report['perplexity']:.2f}",
                     f"{answer_perplexity(scorer, documents, answers):.4f}",
                     f"{report['kl_mean']:.2e}",
                     f"{report['kl_p99']:.2e}", f"{report['top1_agreement']:.1%}",
                     f"{accuracy:.1%}"))
        runtime.close()
        print(f"{mode}: {report}", file=sys.stderr, flush=True)
    header = ("model", "file MB", "perplexity", "answer perplexity", "KL mean", "KL p99",
              "top-1 agreement", "task exact match")
    note = f"; not possible on its 64-wide rows: {', '.join(skipped)}" if skipped else ""
    return header, rows, (f"bundled tiny model; {len(documents)} held-out chat exchanges, "
                          f"{report['tokens']} predicted tokens{note}")


def random_sequences(vocab_size, sequences=4, length=256):
    """`sequences` lists of `length` random ids (`<bos>` first, then ids past the special
    tokens)."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [[2, *rng.integers(110, vocab_size, length - 1).tolist()] for _ in range(sequences)]


def agreement_rows(files, tokenizer, ids, reference_logits):
    """(mode, file MB, KL mean, KL p99, top-1) of each `{mode: .tflite}` against the
    reference's logits of `ids`; one file open at a time."""
    import numpy as np

    from gemma_keras.evaluation.agreement import _compare_logits
    from gemma_keras.evaluation.scorers import TFLiteScorer
    from gemma_keras.tflite import GemmaTFLite

    rows = []
    for mode, path in files.items():
        start = time.time()
        try:
            runtime = GemmaTFLite(path, tokenizer, weight_cache=False)
        except RuntimeError as error:  # e.g. XNNPACK refusing a node: a row that says so
            rows.append((mode, f"{Path(path).stat().st_size / 1e6:.0f}", "-", "-",
                         "does not load (LiteRT RuntimeError, see stderr)"))
            print(f"{mode}: {error}", file=sys.stderr, flush=True)
            continue
        scorer = TFLiteScorer(runtime, mode)
        kl, top1 = [], []
        for seq, ref in zip(ids, reference_logits):
            k, t, _, _ = _compare_logits(scorer.logits([seq])[0], ref, seq, len(seq) - 1)
            kl.append(k)
            top1.append(t)
        runtime.close()
        kl, top1 = np.concatenate(kl), np.concatenate(top1)
        rows.append((mode, f"{Path(path).stat().st_size / 1e6:.0f}", f"{kl.mean():.2e}",
                     f"{np.percentile(kl, 99):.2e}", f"{top1.mean():.1%}"))
        print(f"{mode}: KL {kl.mean():.3e} top1 {top1.mean():.3f} ({time.time() - start:.0f} s)",
              file=sys.stderr, flush=True)
    return ("model", "file MB", "KL mean", "KL p99", "top-1 agreement"), rows


def reference_logits(model, ids):
    """The float model's logits [n, vocab] of each sequence, one forward pass each."""
    from gemma_keras.evaluation.scorers import KerasScorer

    reference = KerasScorer(model, batch_size=1)
    return [reference.logits([s])[0] for s in ids]


def wide_rows(modes, layers, work, sequences=4, length=256):
    import tflite_2b  # noqa: E402  (random_causal_lm, padded_tokenizer)

    from gemma_keras.config import Gemma2Config
    from gemma_keras.tflite.export import export_tflite_variants
    from gemma_keras.tokenizer import GemmaTokenizer

    config = Gemma2Config.preset("gemma2_2b")
    config = Gemma2Config(**{**config.to_dict(), "num_hidden_layers": layers,
                             "layer_types": None})
    model = tflite_2b.random_causal_lm(config)
    tokenizer = tflite_2b.padded_tokenizer(config.vocab_size, work / "tokenizer.model")
    model.tokenizer = GemmaTokenizer(tokenizer)
    files = export_tflite_variants(model, {m: work / f"wide_{m}.tflite" for m in modes},
                                   kv_cache_max_len=length + 64, prefill_lens=(64,),
                                   score_lens=(64,), progress=False)
    ids = random_sequences(config.vocab_size, sequences, length)
    header, rows = agreement_rows(files, tokenizer, ids, reference_logits(model, ids))
    return header, rows, (f"random Gemma 2 2B width, {layers} of 26 layers; {sequences} "
                          f"random sequences of {length} tokens")


def hf_rows(modes, hf_dir, work, sequences=4, length=256, keep=False):
    """`wide_rows` for a Hugging Face checkpoint directory (see the module docstring)."""
    import gc

    import numpy as np

    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.config import Gemma2Config
    from gemma_keras.tflite.export import export_tflite_variants

    config = Gemma2Config.from_json_file(Path(hf_dir) / "config.json")
    ids = random_sequences(config.vocab_size, sequences, length)
    cached = work / f"reference_logits_{sequences}x{length}.npy"
    if cached.exists():
        logits = list(np.load(cached, mmap_mode="r"))
    else:
        start = time.time()
        model = Gemma2CausalLM.from_pretrained(hf_dir, dtype="float32")
        loaded = time.time() - start
        logits = reference_logits(model, ids)
        print(f"float32 reference: loaded in {loaded:.0f} s, scored in "
              f"{time.time() - start - loaded:.0f} s", file=sys.stderr, flush=True)
        del model
        gc.collect()
        np.save(cached, np.stack(logits))
    rows = []
    for mode in modes:  # one file on disk at a time (the fp16 2B alone is 5.2 GB)
        path = work / f"{mode}.tflite"
        made = not path.exists()
        if made:
            start = time.time()
            export_tflite_variants(str(hf_dir), {mode: path}, kv_cache_max_len=512,
                                   prefill_lens=(64,), score_lens=(64,), progress=False)
            print(f"exported {mode} in {time.time() - start:.0f} s", file=sys.stderr,
                  flush=True)
        header, row = agreement_rows({mode: path}, str(Path(hf_dir) / "tokenizer.model"), ids,
                                     logits)
        rows += row
        if made and not keep:
            path.unlink()
    return header, rows, (f"{hf_dir} ({config.num_hidden_layers} layers, vocabulary "
                          f"{config.vocab_size}) against its float32 Keras model; {sequences} "
                          f"random sequences of {length} tokens")


def main():
    from gemma_keras.tflite.quantize import QUANTIZATIONS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=None,
                        help="a random model of the 2B's width with this many layers")
    parser.add_argument("--hf", default=None, metavar="DIR",
                        help="a Hugging Face checkpoint directory (e.g. the random full 2B)")
    parser.add_argument("--work", default=None, metavar="DIR",
                        help="with --hf: where the reference's logits are cached and each "
                             ".tflite file is written (reused when present), scored and "
                             "deleted unless --keep")
    parser.add_argument("--keep", action="store_true", help="with --hf: keep the exports")
    parser.add_argument("--modes", default=",".join(QUANTIZATIONS),
                        help="comma-separated quantization modes (default all)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    head = machine.describe()
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="eval_quantization_", dir="/tmp") as work:
        if args.hf:
            header, rows, what = hf_rows(modes, args.hf, Path(args.work or work),
                                             keep=args.keep)
        elif args.layers:
            header, rows, what = wide_rows(modes, args.layers, Path(work))
        else:
            header, rows, what = tiny_rows(modes, Path(work))
    print(f"{head}\n\n{what}; {time.time() - start:.0f} s\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")


if __name__ == "__main__":
    main()
