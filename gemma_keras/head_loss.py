"""The output head and its cross-entropy in one pass, a chunk of tokens at a time.

Keras' loss takes the model's logits: for the 2B, float32 [tokens, 256000], 0.5 GiB at 512
tokens, and as much again for the soft-cap's tanh and for the softmax gradient. When the head
is frozen (LoRA, an int8 base), `Gemma2CausalLM`'s training step does without them: its
training call returns the final hidden states and `lm_loss_and_predictions` computes the head,
soft-cap, cross-entropy, argmax and the loss's gradient with respect to the hidden states for
a chunk of `CHUNK_ELEMENTS // vocab_size` tokens at a time, so one chunk's logits are alive
at once whatever the sequence length.

The gradient costs no extra work: the loss is the step's last operation, so its gradient with
respect to the hidden states `h` is known in the forward pass (one product forward, one back,
as autodiff would do). The loss returned is `stop_gradient(L) + sum((h - stop_gradient(h)) *
stop_gradient(dL/dh))`: its value is exactly L (the second term is zero) and its gradient with
respect to `h` is dL/dh, from which autodiff carries on through the decoder.

The loss is `training.masked_lm_loss()`'s: the cross-entropy of the soft-capped logits
averaged over the tokens' `sample_weight` (all tokens when there is none).
"""

from __future__ import annotations

import keras
from keras import ops

from gemma_keras.matmul import read_after

CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MiB in float32, 65 tokens of the 2B's vocabulary
# The training call's output when this loss applies, and where the loss leaves the argmax.
HIDDEN_STATES, PREDICTIONS = "hidden_states", "predictions"


def applies(model) -> bool:
    """Whether `model`'s training step uses this loss: compiled with the default loss and
    metrics, the head (the tied embedding) frozen, on TensorFlow or JAX."""
    return (getattr(model, "_chunked_head_loss", False)
            and not any(w.trainable for w in model.backbone.embed_tokens.weights)
            and keras.backend.backend() in ("tensorflow", "jax"))


def chunk_tokens(vocab_size, tokens=None):
    """Tokens per chunk: as many as CHUNK_ELEMENTS logits hold (at most `tokens`)."""
    chunk = max(1, CHUNK_ELEMENTS // vocab_size)
    return chunk if tokens is None else max(1, min(chunk, tokens))


def lm_loss_and_predictions(model, hidden, labels, sample_weight=None):
    """`(loss, predictions)` for `hidden` [B, T, hidden] (the backbone's output), `labels`
    [B, T] and `sample_weight` [B, T] (or None): the weighted mean cross-entropy of
    `model.logits(hidden)`, whose gradient reaches `hidden`, and the argmax token ids
    [B, T] (int32)."""
    batch, seq = ops.shape(hidden)[0], ops.shape(hidden)[1]
    width = hidden.shape[-1]
    h = ops.reshape(hidden, (-1, width))
    y = ops.reshape(ops.cast(labels, "int32"), (-1,))
    w = (ops.ones_like(y, "float32") if sample_weight is None
         else ops.reshape(ops.cast(sample_weight, "float32"), (-1,)))
    w = ops.divide_no_nan(w, ops.sum(w))  # Keras' "mean_with_sample_weight"

    loss, grads, predictions = _chunked(model, ops.stop_gradient(h), y, w)
    h32 = ops.cast(h, "float32")
    loss = ops.stop_gradient(loss) + ops.sum(
        (h32 - ops.stop_gradient(h32)) * ops.stop_gradient(grads))
    return loss, ops.reshape(predictions, (batch, seq))


def _chunked(model, h, y, w):
    """Loss value, its gradient [N, hidden] (float32) and the argmax ids [N], a chunk of
    tokens at a time (a loop: one chunk's logits alive at once)."""
    n, width = ops.shape(h)[0], h.shape[-1]
    vocab = model.config.vocab_size
    chunk = chunk_tokens(vocab, n if isinstance(n, int) else None)
    chunks = (n + chunk - 1) // chunk
    padded = chunks * chunk
    pad = padded - n  # the last chunk is padded with weight-0 tokens
    h = ops.pad(h, [[0, pad], [0, 0]])
    y = ops.pad(y, [[0, pad]])
    w = ops.pad(w, [[0, pad]])

    def body(i, carry):
        loss, grads, predictions = carry
        start = i * chunk
        h_c = ops.slice(read_after(h, loss), (start, 0), (chunk, width))
        y_c = ops.slice(y, (start,), (chunk,))
        w_c = ops.slice(w, (start,), (chunk,))
        logits, pullback = value_and_pullback(model.logits, h_c)  # float32, soft-capped
        log_z = ops.logsumexp(logits, axis=-1)
        label_logits = ops.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
        loss = loss + ops.sum(w_c * (log_z - label_logits))
        probs = ops.exp(logits - log_z[:, None])
        d_logits = (probs - ops.one_hot(y_c, vocab, dtype="float32")) * w_c[:, None]
        d_h = ops.cast(pullback(d_logits), "float32")
        grads = ops.slice_update(grads, (start, 0), d_h)
        ids = ops.cast(ops.argmax(logits, axis=-1), "int32")
        predictions = ops.slice_update(predictions, (start,), ids)
        return loss, grads, predictions

    init = (ops.zeros((), "float32"), ops.zeros((padded, width), "float32"),
            ops.zeros((padded,), "int32"))
    loss, grads, predictions = ops.fori_loop(0, chunks, body, init)
    return loss, grads[:n], predictions[:n]


def value_and_pullback(fn, x):
    """`(fn(x), pullback)`, `pullback(g)` being the gradient of `sum(fn(x) * g)` with
    respect to `x` (the backend's own autodiff of `fn`)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        y, vjp = jax.vjp(fn, x)
        return y, lambda g: vjp(g)[0]
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        return y, lambda g: tape.gradient(y, x, output_gradients=g)
    raise NotImplementedError(f"the chunked head loss needs TensorFlow or JAX, not {backend}")
