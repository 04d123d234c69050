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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-keras",
        description="Gemma 2 in Keras: convert, generate, chat, fine-tune, export.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"gemma_keras.commands.{info.name}")
        module.register(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"gemma-keras {args.command}: error: {e}", file=sys.stderr)
        return 1


def _quiet_litert_exit():
    """LiteRT's process-wide environment logs "DestroyAccelerator" lines on stderr when the
    interpreter shuts down, after the command's output: drop stderr at exit if LiteRT was
    used. Only for the console command; `main` leaves the process alone."""
    if "ai_edge_litert" in sys.modules:
        import atexit
        import os

        def drop_stderr():
            sys.stderr.flush()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)

        atexit.register(drop_stderr)


def run():
    """The `gemma-keras` console command: `main` on sys.argv, then exit with its status."""
    status = main()
    _quiet_litert_exit()
    sys.exit(status)


if __name__ == "__main__":
    run()
