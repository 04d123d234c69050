"""File-level helpers shared by both directions: atomic output directories, the tokenizer."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

TOKENIZER_NAME = "tokenizer.model"


@contextlib.contextmanager
def atomic_directory(out_dir, overwrite=False):
    """Yield a temporary directory beside `out_dir`, renamed to `out_dir` when the block ends
    without error; on any error (or Ctrl-C) it is deleted and `out_dir` is left untouched.

    An existing `out_dir` is an error unless `overwrite` is true (then it is replaced only
    once the new directory is complete).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial",
                                dir=out_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; readers may be other users
        if out_dir.exists():
            old = tmp.with_suffix(".old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
