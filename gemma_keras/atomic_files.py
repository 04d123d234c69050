"""Output files and directories that appear only when complete.

Everything this package writes goes through here: the output is written under a temporary
name beside its destination and renamed when complete, so an error or Ctrl-C leaves no
half-written model, checkpoint or export behind (and an existing file stays as it was).
Pure Python, so the TFLite runtime can use it.

Example:
>>> with atomic_file("out.tflite") as tmp:
...     tmp.write_bytes(data)        # or pass tmp to any writer that takes a path
>>> write_atomically("out.txt", "hello\\n")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary `Path` beside `path`; it is renamed to `path` when the block ends
    without error (replacing any file there), and deleted otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; readers may be others
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomically(path, data):
    """Write `data` (bytes or str) to `path` through `atomic_file`."""
    with atomic_file(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


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
