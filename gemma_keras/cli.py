"""The `gemma-keras` command line: one entry point, one subcommand per module.

Each module in `gemma_keras.commands` defines `register(subparsers)`, which adds its parser
and sets `func` to a function taking the parsed arguments. The CLI only parses arguments and
calls library functions.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import gemma_keras.commands as commands
from gemma_keras import console_logs, defaults


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-keras",
        description="Gemma 2 in Keras: convert, generate, chat, fine-tune, export.",
        epilog=f"TensorFlow, XLA and LiteRT log lines are hidden; --verbose (or "
               f"{console_logs.VERBOSE_ENV}=1) shows them.",
    )
    parser.add_argument("--verbose", action="store_true",
                        help="show the native libraries' log lines on stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"gemma_keras.commands.{info.name}")
        module.register(subparsers)
    return parser


def main(argv=None, quiet=False) -> int:
    """Parse `argv` and run the subcommand; `quiet` hides native log lines (unless
    `--verbose` or GEMMA_KERAS_VERBOSE=1)."""
    defaults.prefer_onednn()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if quiet and not args.verbose and not console_logs.verbose_requested():
        console_logs.quiet_native_logs()
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"gemma-keras {args.command}: error: {e}", file=sys.stderr)
        return 1


def run():
    """The `gemma-keras` console command: `main` on sys.argv, quiet, then exit with its status."""
    sys.exit(main(quiet=True))


if __name__ == "__main__":
    run()
