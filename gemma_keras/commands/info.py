"""`gemma-keras info`: the config and parameter count of a preset or a model directory."""

import json
import os

from gemma_keras.config import PRESETS, Gemma2Config


def register(subparsers):
    p = subparsers.add_parser("info", help="show a preset's or checkpoint's config and size")
    p.add_argument("source", help="a preset name (gemma2_2b, gemma2_9b, gemma2_27b) or a "
                                  "directory with config.json")
    p.set_defaults(func=run)


def run(args):
    if args.source in PRESETS:
        config = Gemma2Config.preset(args.source)
    else:
        config = Gemma2Config.from_json_file(os.path.join(args.source, "config.json"))
    print(json.dumps(config.to_dict(), indent=2))
    print(f"parameters: {config.num_parameters():,}")
