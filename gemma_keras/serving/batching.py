"""In-graph request batching: TensorFlow's `BatchFunction` op around the generation.

Concurrent `Session::Run` calls that reach the op (one per request, on one loaded model) wait
up to `batch_timeout_micros` for each other; their per-prompt inputs are concatenated along
dimension 0 (padded up to the next allowed batch size by repeating the first row), the
batched function runs once, and each call gets its own rows back. This works in any server
that runs the SavedModel (TensorFlow Serving without `--enable_batching`, a Python process
with threads, ...), because the batching happens inside the graph.
"""

from __future__ import annotations

import dataclasses

SHARED_NAME = "gemma_generate"  # the batcher resource all calls of the serving function share


@dataclasses.dataclass(frozen=True)
class InGraphBatching:
    """Settings of the `BatchFunction` op (TensorFlow's names).

    Args:
      max_batch_size: the most prompts (rows) one batched run holds; a request with more
        prompts is refused with INVALID_ARGUMENT.
      batch_timeout_micros: how long the first request of a batch waits for others.
      allowed_batch_sizes: batch sizes a run is padded up to, increasing and ending with
        `max_batch_size`; default: the powers of two below `max_batch_size`, then it.
      num_batch_threads: batches run in parallel.
      max_enqueued_batches: batches that may wait; beyond them a request fails
        (UNAVAILABLE).
    """

    max_batch_size: int = 8
    batch_timeout_micros: int = 20_000
    allowed_batch_sizes: tuple = ()
    num_batch_threads: int = 1
    max_enqueued_batches: int = 100

    def __post_init__(self):
        for name in ("max_batch_size", "num_batch_threads", "max_enqueued_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        timeout = self.batch_timeout_micros
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
            raise ValueError(f"batch_timeout_micros must be an integer >= 0, got {timeout!r}")
        sizes = tuple(self.allowed_batch_sizes) or self._default_sizes()
        if (any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes)
                or list(sizes) != sorted(set(sizes)) or sizes[-1] != self.max_batch_size):
            raise ValueError(f"allowed_batch_sizes must increase and end with max_batch_size "
                             f"({self.max_batch_size}), got {list(sizes)}")
        object.__setattr__(self, "allowed_batch_sizes", sizes)

    def _default_sizes(self):
        sizes, size = [], 1
        while size < self.max_batch_size:
            sizes.append(size)
            size *= 2
        return (*sizes, self.max_batch_size)


def batch_function(options: InGraphBatching, fn, rows):
    """`fn(*rows)` run through a `BatchFunction` op with `options` (call inside a trace).

    `rows` are tensors with the batch on dimension 0; `fn` returns a tuple of tensors, each
    with the batch on dimension 0 and the same shape after it for every batch.
    """
    import tensorflow as tf
    from tensorflow.python.ops import gen_batch_ops

    computation = tf.function(fn, autograph=False).get_concrete_function(
        *[tf.TensorSpec([None, *r.shape[1:]], r.dtype, name=f"batch_{i}")
          for i, r in enumerate(rows)])
    outputs = gen_batch_ops.batch_function(
        in_tensors=list(rows),
        captured_tensors=computation.captured_inputs,
        f=computation,
        num_batch_threads=options.num_batch_threads,
        max_batch_size=options.max_batch_size,
        batch_timeout_micros=options.batch_timeout_micros,
        allowed_batch_sizes=list(options.allowed_batch_sizes),
        max_enqueued_batches=options.max_enqueued_batches,
        shared_name=SHARED_NAME,
        enable_large_batch_splitting=False,
        Tout=[o.dtype for o in computation.outputs],
    )
    for out, spec in zip(outputs, computation.outputs):
        out.set_shape([None, *spec.shape[1:]])
    return tuple(outputs)
