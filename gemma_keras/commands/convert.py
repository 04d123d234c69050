"""`gemma-keras convert`: Hugging Face checkpoint or keras-hub preset <-> gemma-keras model
directory."""

import argparse
import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 5GB or 500MB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def register(subparsers):
    p = subparsers.add_parser(
        "convert", help="convert a Hugging Face checkpoint to a Keras model directory, or back",
        description="Convert SRC_DIR into OUT_DIR. A Hugging Face Gemma 2 directory (config.json, "
                    "*.safetensors, tokenizer.model) becomes a gemma-keras model directory "
                    "(config.json, Keras .weights.h5, tokenizer.model, metadata.json); with "
                    "--to hf (the default when SRC_DIR is a gemma-keras directory) the reverse. "
                    "A keras-hub Gemma 2 preset (save_to_preset: config.json, model.weights.h5, "
                    "tokenizer.json, assets/) also becomes a gemma-keras model directory, and "
                    "--to keras-hub writes one from a gemma-keras (or Hugging Face) directory. "
                    "OUT_DIR appears only when the conversion is complete.")
    p.add_argument("src", metavar="SRC_DIR")
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument("--to", choices=("keras", "hf", "keras-hub"), default=None,
                   help="output format (default: the other one than SRC_DIR's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the written weights (default: the source's)")
    p.add_argument("--verify", action="store_true",
                   help="run the converted and the source model on a short input (the source "
                        "through transformers when installed) and fail above --atol")
    p.add_argument("--atol", type=float, default=None,
                   help="largest allowed logit difference for --verify (default 1e-2)")
    p.add_argument("--max-shard-size", type=parse_size, default=None,
                   help="largest weights file (default: 5GB for Hugging Face safetensors, "
                        "2GB for Keras .weights.h5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args):
    from gemma_keras.converters import convert
    from gemma_keras.converters.verify import DEFAULT_ATOL

    if args.to == "keras-hub" or (args.to in (None, "keras") and _is_keras_hub(args.src)):
        return _run_keras_hub(args)
    if args.to == "hf" and _is_keras_hub(args.src):
        raise ValueError(f"{args.src} is a keras-hub preset: convert it to a gemma-keras "
                         "directory first (gemma-keras convert PRESET DIR), then --to hf")
    to = args.to or ("hf" if convert.detect_format(args.src) == "keras" else "keras")
    function = convert.convert_keras_to_hf if to == "hf" else convert.convert_hf_to_keras
    kwargs = {} if args.max_shard_size is None else {"max_shard_bytes": args.max_shard_size}
    summary = function(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite,
                       verify=args.verify, atol=args.atol or DEFAULT_ATOL,
                       progress=not args.quiet, **kwargs)
    if summary.verify is not None:
        print(summary.verify.line())
    print(summary.line())
    return 0


def _is_keras_hub(src) -> bool:
    from gemma_keras.converters.keras_hub import is_keras_hub_preset

    return is_keras_hub_preset(src)


def _run_keras_hub(args):
    """keras-hub preset -> gemma-keras directory, or back with --to keras-hub."""
    from gemma_keras.converters import keras_hub

    if args.verify or args.atol is not None:
        raise ValueError("--verify is for Hugging Face conversions; a keras-hub conversion "
                         "is exact (transposes and reshapes only)")
    if args.to == "keras-hub":
        if args.max_shard_size is not None:
            raise ValueError("--max-shard-size: a keras-hub preset is written as one "
                             "model.weights.h5")
        summary = keras_hub.convert_keras_to_keras_hub(
            args.src, args.out, dtype=args.dtype, overwrite=args.overwrite,
            progress=not args.quiet)
    else:
        kwargs = {} if args.max_shard_size is None else {"max_shard_bytes": args.max_shard_size}
        summary = keras_hub.convert_keras_hub_to_keras(
            args.src, args.out, dtype=args.dtype, overwrite=args.overwrite,
            progress=not args.quiet, **kwargs)
    print(summary.line())
    return 0
