"""`gemma-keras generate`: complete a prompt, printing the text as it streams."""

import argparse
import sys

from gemma_keras import tflite
from gemma_keras.tokenizer import tokenizer_of

SAMPLERS = ("greedy", "temperature", "top_k", "top_p")


def add_model_arguments(p):
    """--model / --tflite / --tokenizer / --dtype, shared with `chat`."""
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, metavar="DIR",
                        help="a gemma-keras or Hugging Face model directory (default: the "
                             "bundled tiny model)")
    source.add_argument("--tflite", default=None, metavar="FILE",
                        help="a .tflite export, run with the LiteRT interpreter instead")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.model for --tflite (default: the one beside the file)")
    p.add_argument("--dtype", default=None, help="Keras dtype for --model (default: as saved)")


def add_sampling_arguments(p, max_new_tokens):
    """--max-new-tokens, --sampler and its settings, --seed; shared with `chat`."""
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=f"most tokens to generate (default {max_new_tokens}, or what fits "
                        "the model's context or the file's cache)")
    p.add_argument("--sampler", choices=SAMPLERS, default="greedy",
                   help="decoding strategy (default greedy)")
    p.add_argument("--temperature", type=float, default=None,
                   help="softmax temperature for the sampling strategies (default 1.0; "
                        "0 is greedy)")
    p.add_argument("--top-k", type=int, default=None,
                   help="keep the k most likely tokens (default 50 for --sampler top_k; "
                        "combines with --top-p)")
    p.add_argument("--top-p", type=float, default=None,
                   help="keep the most likely tokens up to probability p, in (0, 1] "
                        "(default 0.9 for --sampler top_p; combines with --top-k)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def sampling_kwargs(args):
    return dict(sampler=args.sampler, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p)


def load(args):
    """The model the arguments name: a GemmaTFLite for --tflite, else a Gemma2CausalLM."""
    if args.tflite:
        return tflite.GemmaTFLite(args.tflite, args.tokenizer)
    if args.tokenizer:
        raise ValueError("--tokenizer goes with --tflite; a --model directory has its own")
    from gemma_keras.pretrained import load_model

    return load_model(args.model, dtype=args.dtype)


def register(subparsers):
    p = subparsers.add_parser(
        "generate", help="complete a prompt, streaming the text to stdout",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Complete PROMPT with a Keras model (--model) or a TFLite export\n"
                    "(--tflite), printing the completion as it is produced. Generation stops\n"
                    "at <eos> or <end_of_turn>, or after --max-new-tokens.",
        epilog="examples:\n"
               '  gemma-keras generate --model gemma2-2b-keras "The capital of France is"\n'
               '  gemma-keras generate --chat "reverse: cat dog sun"    # the tiny model\n'
               '  gemma-keras generate --tflite m.tflite --sampler top_p --seed 0 "Once"',
    )
    p.add_argument("prompt", help='the prompt text ("-" reads it from stdin)')
    add_model_arguments(p)
    add_sampling_arguments(p, max_new_tokens=64)
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user turn of Gemma's chat template")
    p.add_argument("--truncate", action="store_true",
                   help="keep the end of a prompt that is too long instead of refusing it")
    p.set_defaults(func=run)


def run(args):
    prompt = sys.stdin.read().rstrip("\n") if args.prompt == "-" else args.prompt
    if not prompt:
        raise ValueError("the prompt is empty")
    model = load(args)
    if args.chat:
        prompt = tokenizer_of(model, "--chat").apply_chat_template([{"role": "user", "content": prompt}])
    kwargs = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, **sampling_kwargs(args))
    if args.truncate:
        kwargs["truncate"] = True
    for piece in model.stream(prompt, **kwargs):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
