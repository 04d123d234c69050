"""`gemma-keras export-tflite`: a model directory to one `.tflite` file with a KV cache."""

import argparse
import os
import shutil
import sys
from pathlib import Path

from gemma_keras import defaults
from gemma_keras.commands.eval import format_report
from gemma_keras.config import Gemma2Config
from gemma_keras.evaluation.data import read_documents
from gemma_keras.evaluation.export_check import check_export
from gemma_keras.tflite.export import export_tflite
from gemma_keras.tflite.litertlm import write_litertlm
from gemma_keras.tflite.quantize import DEFAULT_INT8, QUANTIZATIONS
from gemma_keras.tiny_task import model_dir_or_tiny


def parse_lengths(text):
    """'8,64,256' -> (8, 64, 256)."""
    try:
        lengths = tuple(int(part) for part in text.split(","))
    except ValueError:
        lengths = ()
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers like 8,64,256, got {text!r}")
    return lengths


def derive_lengths(model_dir, kv_cache_max_len, prefill_lens):
    """The cache and prefill lengths, defaults derived from the model's config (with a note
    on stderr when a default was clamped)."""
    config = Gemma2Config.from_json_file(model_dir / "config.json")
    kv_cache_max_len, kv_note = defaults.kv_cache_max_len(
        kv_cache_max_len, config.max_position_embeddings)
    prefill_lens, prefill_note = defaults.prefill_lens(prefill_lens, kv_cache_max_len)
    for note in (kv_note, prefill_note):
        if note:
            print(f"note: {note}", file=sys.stderr)
    return kv_cache_max_len, prefill_lens


def register(subparsers):
    p = subparsers.add_parser(
        "export-tflite", help="export a model to one .tflite file (prefill/decode, KV cache)",
        description="Export a model directory to a .tflite file that the LiteRT interpreter "
                    "(gemma_keras.tflite.GemmaTFLite, or `gemma-keras generate --tflite`) and "
                    "Google's LiteRT-LM runtime read: signatures prefill_<T> (one per "
                    "--prefill-lens entry) and decode, with the KV cache passed in and out. "
                    "Only builtin TFLite ops; the tied embedding is stored once. The model's "
                    "tokenizer.model is copied beside the file unless one is already there.",
        epilog="example: gemma-keras export-tflite --model gemma2-2b --out gemma2_int4.tflite "
               "--quantize int4_block32 --kv-cache-max-len 1280",
    )
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a gemma-keras or Hugging Face model directory (default: the bundled "
                        "tiny model)")
    p.add_argument("--out", required=True, metavar="FILE.tflite", help="the file to write")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=DEFAULT_INT8,
                   help="none (float32); fp16 and dynamic_int8 (TensorFlow's converter's "
                        "encodings, per-tensor int8); int8_channel (int8, one scale per row); "
                        "weight_only_int8 (ai-edge-quantizer); int4_block32, int4_block128, "
                        "int4_channel (int4 with one scale per 32 or 128 weights, or per "
                        "row: the fastest on CPU). "
                        f"Default: {DEFAULT_INT8}")
    p.add_argument("--kv-cache-max-len", type=int, default=None, metavar="N",
                   help="cache slots: the most tokens (prompt + generated) per conversation "
                        "(default 1024, or the model's max_position_embeddings if smaller)")
    p.add_argument("--prefill-lens", type=parse_lengths, default=None, metavar="T,T,...",
                   help="one prefill signature per length (default 8,64,256: those that fit "
                        "the cache)")
    p.add_argument("--bundle", choices=("none", "litertlm"), default="none",
                   help="litertlm: also write FILE.litertlm (the .tflite, the tokenizer and "
                        "Gemma's LlmMetadata) for Google's LiteRT-LM engine")
    p.add_argument("--score-lens", type=parse_lengths, default=None, metavar="T,T,...",
                   help="also write score_<T> signatures (logits at every position) for "
                        "`gemma-keras eval --tflite` (default none; 64 with --check)")
    p.add_argument("--check", nargs="?", const="", default=None, metavar="FILE",
                   help="after exporting, score FILE (.jsonl or .txt; default a built-in "
                        "held-out text) with the export and the float model: perplexity, KL "
                        "divergence, top-1 agreement, and a warning beyond the thresholds of "
                        "docs/evaluation.md")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args):
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    if out.suffix != ".tflite":
        raise ValueError(f"--out should name a .tflite file, got {out}")
    if args.bundle == "litertlm" and out.with_suffix(".litertlm").exists() and not args.overwrite:
        raise ValueError(f"{out.with_suffix('.litertlm')} exists; pass --overwrite to replace it")
    if args.check:  # bad --check data fails before the export
        read_documents(args.check)
    model_dir = Path(model_dir_or_tiny(args.model))
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # the exporter traces with TF
    args.kv_cache_max_len, args.prefill_lens = derive_lengths(
        model_dir, args.kv_cache_max_len, args.prefill_lens)

    score_lens = args.score_lens or ()
    if args.check is not None:
        score_lens = defaults.score_lens(args.score_lens, args.kv_cache_max_len)
    export_tflite(model_dir, out, quantize=args.quantize,
                  kv_cache_max_len=args.kv_cache_max_len, prefill_lens=args.prefill_lens,
                  progress=not args.quiet, score_lens=score_lens)
    print(f"wrote {out} ({out.stat().st_size:,} bytes, quantize={args.quantize}, "
          f"prefill {','.join(map(str, args.prefill_lens))})")
    tokenizer, beside = model_dir / "tokenizer.model", out.parent / "tokenizer.model"
    if tokenizer.is_file() and not beside.exists():
        shutil.copyfile(tokenizer, beside)
        print(f"copied {tokenizer} to {beside}")
    if args.bundle == "litertlm":
        bundle = write_litertlm(out, tokenizer, out.with_suffix(".litertlm"))
        print(f"wrote {bundle} ({bundle.stat().st_size:,} bytes) for the LiteRT-LM engine")
    if args.check is not None:
        _check(args, out, model_dir, tokenizer)
    return 0


def _check(args, out, model_dir, tokenizer):
    """Print the export's agreement with the float model; warnings on stderr."""
    report = check_export(out, model_dir, data=args.check or None,
                          tokenizer=tokenizer if tokenizer.is_file() else None,
                          progress=not args.quiet)
    print(f"check on the {report['data']} against the float model:")
    print(format_report(report))
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
