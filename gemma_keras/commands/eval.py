"""`gemma-keras eval`: perplexity, agreement with a float reference, multiple choice and
lm-evaluation-harness tasks, on a Keras model, a .tflite export or a SavedModel."""

import argparse
import json
import os

from gemma_keras.evaluation.evaluate import evaluate

# Report fields in print order (text output); --json prints every field.
TEXT_FIELDS = ("model", "reference", "documents", "windows", "context", "stride", "tokens",
               "perplexity", "nll", "bits_per_byte", "reference_perplexity",
               "reference_nll", "ln_ppl_ratio", "kl_mean", "kl_median", "kl_p99", "kl_max",
               "top1_agreement", "log_prob_abs_diff_mean", "log_prob_abs_diff_p99",
               "count", "accuracy", "accuracy_norm")


def register(subparsers):
    p = subparsers.add_parser(
        "eval", help="perplexity, KL against a float model, multiple choice, lm-eval tasks",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score a Keras model directory (--model, default the bundled tiny model),\n"
                    "a .tflite export (--tflite, with score_<T> signatures: export-tflite\n"
                    "--score-lens) or a SavedModel version directory (--saved-model).\n"
                    "--task perplexity: --data FILE.jsonl ({\"text\"} per line, one document\n"
                    "each) or FILE.txt (one document, in windows). With --reference DIR (a\n"
                    "Keras model directory), KL divergence, top-1 agreement and both\n"
                    "perplexities. --task choice: --data FILE.jsonl of {\"prompt\", \"choices\",\n"
                    "\"answer\"}. --tasks: lm-evaluation-harness tasks (pip install\n"
                    "gemma-keras[eval]). See docs/evaluation.md.",
        epilog="examples:\n"
               "  gemma-keras eval --model gemma2-2b-keras --data wiki.txt --context 512\n"
               "  gemma-keras eval --tflite g_int4.tflite --reference gemma2-2b-keras "
               "--data wiki.jsonl --json\n"
               "  gemma-keras eval --saved-model /models/gemma/1 --task choice --data q.jsonl\n"
               "  gemma-keras eval --model gemma2-2b-keras --tasks arc_easy --limit 100",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, metavar="DIR",
                        help="a gemma-keras or Hugging Face model directory (default: the "
                             "bundled tiny model)")
    source.add_argument("--tflite", default=None, metavar="FILE",
                        help="a .tflite export with score_<T> signatures")
    source.add_argument("--saved-model", default=None, metavar="DIR",
                        help="a SavedModel version directory (BASE_DIR/N)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.model for --tflite (default: the one beside the file)")
    p.add_argument("--dtype", default=None, help="Keras dtype for --model (default: as saved)")
    p.add_argument("--task", choices=("perplexity", "choice"), default="perplexity",
                   help="default perplexity")
    p.add_argument("--data", default=None, metavar="FILE", help=".jsonl or .txt data")
    p.add_argument("--context", type=int, default=None, metavar="N",
                   help="tokens per scoring window (default 1024, or what the runtime holds "
                        "if less)")
    p.add_argument("--stride", type=int, default=None, metavar="N",
                   help="score documents longer than --context in windows starting every N "
                        "tokens (default for .txt: --context, disjoint windows; .jsonl "
                        "documents longer than --context are refused without it)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="windows per forward pass (default: as many as keep the logits "
                        "within 512 MiB, at most 32)")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="a Keras model directory to compare with (KL divergence, top-1)")
    p.add_argument("--output", default=None, metavar="FILE.jsonl",
                   help="--task choice: one line per question with its scores and pred")
    p.add_argument("--tasks", default=None, metavar="NAMES",
                   help="comma-separated lm-evaluation-harness tasks, instead of --task")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="a folder of lm-evaluation-harness task YAML files")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="--tasks: at most N documents per task")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="N",
                   help="--tasks: few-shot examples per prompt")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def format_report(report) -> str:
    """The report as aligned `name: value` lines (lm-eval results as its own table)."""
    if "table" in report:
        return report["table"]
    lines = [f"task: {report.get('task')}"]
    for key in TEXT_FIELDS:
        value = report.get(key)
        if value is None and not (key.startswith("kl_") or key == "top1_agreement"):
            continue
        if key not in report:
            continue
        text = "n/a" if value is None else f"{value:.6g}" if isinstance(value, float) else value
        lines.append(f"{key}: {text}")
    if "unavailable" in report:
        lines.append(f"n/a: {report['unavailable']['reason']}")
    return "\n".join(lines)


def run(args):
    for name in ("context", "stride", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got "
                             f"{value}")
    if args.tflite is None:
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # before a scorer loads Keras

    try:
        report = evaluate(
            data=args.data, task=args.task, model=args.model, tflite=args.tflite,
            saved_model=args.saved_model, tokenizer=args.tokenizer, dtype=args.dtype,
            reference=args.reference, context=args.context, stride=args.stride,
            batch_size=args.batch_size, output=args.output,
            tasks=args.tasks.split(",") if args.tasks else None,
            include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot,
            progress=not args.quiet)
    except ImportError as e:  # an optional dependency (lm-eval, ai-edge-litert) is missing
        raise ValueError(str(e)) from None
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "table"}, default=str))
    else:
        print(format_report(report))
    return 0
