"""A quiet console: what native libraries log on stderr is dropped unless asked for.

TensorFlow, XLA, absl and LiteRT write start-up and teardown lines to file descriptor 2
("Could not find cuda drivers", "failed call to cuInit", "XLA service ... initialized",
"DestroyAccelerator", ...): noise for a user of `gemma-keras generate`. Some come before absl
reads any setting, so `TF_CPP_MIN_LOG_LEVEL` alone cannot remove them. `quiet_native_logs()`
sets the level and passes stderr through a filter that drops lines in absl's format (below
FATAL) and absl's pre-initialisation notice; everything else (this package's warnings and
errors, Python tracebacks, progress bars) goes through unchanged.

The console command calls it unless `--verbose` is given or `GEMMA_KERAS_VERBOSE=1` is set.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

VERBOSE_ENV = "GEMMA_KERAS_VERBOSE"

# absl/glog lines: "I0000 00:00:1796126988.036316    5539 cudart_stub.cc:31] ..." (levels I,
# W, E; F is kept: it comes with a crash), the notice absl prints before it is initialised,
# the second line of TensorFlow's cpu_feature_guard message, SentencePiece's LOG(INFO) lines,
# and LiteRT's own "INFO: " lines.
NOISE = re.compile(
    rb"^(\r?[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^\]]+\] "
    rb"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    rb"|\S+\.cc\(\d+\) LOG\(INFO\) "
    rb"|To enable the following instructions: .* rebuild TensorFlow"
    rb"|INFO: (Created TensorFlow Lite|Initialized TensorFlow Lite|Replacing \d+ out of))"
)


def verbose_requested() -> bool:
    """True when `GEMMA_KERAS_VERBOSE` asks for the native logs (1, true, yes)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


class _StderrFilter:
    """File descriptor 2 becomes a pipe; a thread forwards what is not NOISE to the real stderr."""

    def __init__(self):
        sys.stderr.flush()
        self.target = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.read_end = read_end
        self.thread = threading.Thread(target=self._forward, name="stderr-filter", daemon=True)
        self.thread.start()
        atexit.register(self.close)

    def _forward(self):
        pending, dropping = b"", False
        while True:
            chunk = os.read(self.read_end, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not dropping and not NOISE.match(line):
                    os.write(self.target, line + b"\n")
                dropping = False
            # A partial line (a progress bar, a prompt) is forwarded at once unless it is noise.
            if pending:
                if NOISE.match(pending):
                    dropping, pending = True, b""
                elif not dropping:
                    os.write(self.target, pending)
                    pending = b""
                else:
                    pending = b""
        if pending and not dropping:
            os.write(self.target, pending)

    def close(self):
        """At exit: forward what is still in the pipe, then send stderr to /dev/null, since
        native libraries log their teardown (LiteRT's "DestroyAccelerator") after this."""
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)  # the pipe's last write end closes: the thread sees EOF
        os.close(devnull)
        self.thread.join(timeout=5)


_filter = None


def quiet_native_logs():
    """Silence TensorFlow/absl/XLA/LiteRT start-up and teardown logs for this process.

    Call before TensorFlow is imported; a no-op the second time."""
    global _filter
    if _filter is not None:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    _filter = _StderrFilter()
