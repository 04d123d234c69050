"""`gemma-keras export-saved-model`: a versioned SavedModel for TensorFlow Serving."""

import argparse
import os
import sys

from gemma_keras import defaults
from gemma_keras.commands.convert import parse_size
from gemma_keras.serving.batching import InGraphBatching
from gemma_keras.tiny_task import model_dir_or_tiny


def _size(text):
    return parse_size(text)


def _sizes(text):
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected batch sizes like 1,2,4,8, got {text!r}")


def register(subparsers):
    p = subparsers.add_parser(
        "export-saved-model", help="export a model as a SavedModel for TensorFlow Serving",
        description="Write OUT/VERSION/ (saved_model.pb, variables/, assets/tokenizer.model), "
                    "a SavedModel that tensorflow_model_server --model_base_path=OUT serves: "
                    "signature serving_default (prompts -> completions) and score (token ids "
                    "-> log-probabilities). The version directory appears only when complete.")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a model directory (gemma-keras or Hugging Face, with tokenizer.model; "
                        "default: the bundled tiny model)")
    p.add_argument("--out", required=True, metavar="BASE_DIR",
                   help="the model base path (versions are its numbered subdirectories)")
    p.add_argument("--version", type=int, default=None,
                   help="version number (default: one more than the highest in BASE_DIR)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="SentencePiece tokenizer.model (default: the model directory's)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest prompt + completion in tokens a request may ask for "
                        "(default: the model's max_position_embeddings)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default of the request's max_new_tokens input (default: 64, or "
                        "max-length - 1 if smaller)")
    p.add_argument("--max-shard-size", type=_size, default=None,
                   help="largest variables shard, e.g. 1GB or 500MB (default: 1GiB)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype the model is loaded and served in (default: float32 for a "
                        "Hugging Face directory, the saved dtype otherwise)")
    g = p.add_argument_group("concurrent requests and XLA (see docs/serving.md)")
    g.add_argument("--batching", action="store_true",
                   help="every serving_default input is [batch] and required (no defaults), "
                        "for tensorflow_model_server --enable_batching")
    g.add_argument("--in-graph-batching", action="store_true",
                   help="merge concurrent requests inside the graph (BatchFunction op), in "
                        "any server")
    g.add_argument("--max-batch-size", type=int, default=8,
                   help="in-graph batching: most prompts per batched run (default: 8)")
    g.add_argument("--batch-timeout-micros", type=int, default=20_000,
                   help="in-graph batching: how long a request waits for others "
                        "(default: 20000)")
    g.add_argument("--allowed-batch-sizes", type=_sizes, default=(), metavar="N,N,...",
                   help="in-graph batching: sizes a batch is padded to, ending with "
                        "--max-batch-size (default: powers of two, then it)")
    g.add_argument("--num-batch-threads", type=int, default=1,
                   help="in-graph batching: batches run in parallel (default: 1)")
    g.add_argument("--xla", action="store_true",
                   help="XLA-compile the prefill and decode step (serve with "
                        "--xla_cpu_compilation_enabled=true)")
    p.set_defaults(func=run)


def run(args):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from gemma_keras.causal_lm import Gemma2CausalLM  # Keras, on the backend set above
    from gemma_keras.saved_model import export_saved_model

    args.model = model_dir_or_tiny(args.model)
    model = Gemma2CausalLM.from_pretrained(args.model, dtype=args.dtype)
    max_length = args.max_length or model.config.max_position_embeddings
    args.max_new_tokens, note = defaults.serving_max_new_tokens(args.max_new_tokens, max_length)
    if note:
        print(f"note: {note}", file=sys.stderr)
    options = {k: v for k, v in (("max_new_tokens", args.max_new_tokens),
                                 ("max_shard_size", args.max_shard_size)) if v is not None}
    if args.in_graph_batching:
        options["in_graph_batching"] = InGraphBatching(
            max_batch_size=args.max_batch_size, batch_timeout_micros=args.batch_timeout_micros,
            allowed_batch_sizes=args.allowed_batch_sizes,
            num_batch_threads=args.num_batch_threads)
    options.update({k: True for k in ("batching", "xla") if getattr(args, k)})
    path = export_saved_model(model, args.out, version=args.version,
                              tokenizer_path=args.tokenizer, max_length=args.max_length,
                              **options)
    print(f"wrote {path}")
