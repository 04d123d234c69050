"""`gemma-keras chat`: an interactive, turn-by-turn chat in Gemma's template."""

import argparse
import sys

from gemma_keras.chat import ChatSession
from gemma_keras.commands.generate import (
    add_model_arguments,
    add_sampling_arguments,
    load,
    sampling_kwargs,
)

COMMANDS = "/reset forgets the conversation, /exit (or end of input) quits"


def register(subparsers):
    p = subparsers.add_parser(
        "chat", help="chat turn by turn with a model (reads stdin)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read one user message per line from stdin and stream the model's reply\n"
                    "after each, keeping the conversation in Gemma's chat template\n"
                    "(<start_of_turn>user ... <end_of_turn>). The oldest turns are dropped\n"
                    f"when the conversation outgrows the context.\n{COMMANDS}.",
        epilog="examples:\n"
               "  gemma-keras chat --model gemma2-2b-keras --sampler top_p --seed 0\n"
               "  printf 'reverse: cat dog\\nreverse: sun moon\\n' | gemma-keras chat",
    )
    add_model_arguments(p)
    add_sampling_arguments(p, max_new_tokens=256)
    p.set_defaults(func=run)


def run(args):
    session = ChatSession(load(args), max_new_tokens=args.max_new_tokens, seed=args.seed,
                          **sampling_kwargs(args))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chat ({COMMANDS})", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            session.reset()
            continue
        if not text.strip():
            continue
        for piece in session.send(text):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
