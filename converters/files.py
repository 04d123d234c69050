"""File-level helpers shared by both directions: the tokenizer file beside a model."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_NAME = "tokenizer.model"


def copy_tokenizer(source, out_dir) -> bool:
    """Copy a `tokenizer.model` into `out_dir`; False when there is none to copy."""
    if source is None or not Path(source).is_file():
        return False
    shutil.copyfile(source, Path(out_dir) / TOKENIZER_NAME)
    return True


def model_tokenizer_path(model):
    """The `tokenizer.model` behind `model.tokenizer`, or None."""
    tokenizer = getattr(model, "tokenizer", None)
    return getattr(tokenizer, "proto_path", None)


def attach_tokenizer(model, directory):
    """Set `model.tokenizer` to a `GemmaTokenizer` of `directory/tokenizer.model` when the file
    exists and `gemma_keras.tokenizer` is importable; return the model."""
    path = Path(directory) / TOKENIZER_NAME
    if path.is_file():
        try:
            from gemma_keras.tokenizer import GemmaTokenizer
        except ImportError:
            return model
        model.tokenizer = GemmaTokenizer(path)
    return model
