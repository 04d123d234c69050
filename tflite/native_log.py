"""Keep what native libraries (LiteRT, TensorFlow's converter) log on stderr out of the way.

Loading a model and creating its first buffer make LiteRT log about twenty lines (accelerator
registry, vendor compiler plugins it cannot load, XNNPACK), and TensorFlow's converter logs its
MLIR passes: noise for a user of `generate` or `export-tflite`. Errors still surface: both
raise exceptions that carry their message, and the captured text is kept for them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile


@contextlib.contextmanager
def stderr_captured():
    """Send what is written to file descriptor 2 meanwhile to a temporary file; yields a list
    that holds the text afterwards (for an error message)."""
    text = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield text
        finally:
            ctypes.CDLL(None).fflush(None)  # C stdio may hold some of it in its buffer
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            text.append(log.read().strip())
