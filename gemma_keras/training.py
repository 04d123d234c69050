"""Training defaults for `Gemma2CausalLM.compile`: AdamW, masked cross-entropy, masked accuracy.

Batches are `({"token_ids", "padding_mask"}, labels, sample_weight)` (see `gemma_keras.data`):
`labels[b, t]` is the token that follows `token_ids[b, t]` and `sample_weight[b, t]` is 1 where
that token counts (response tokens; never padding). The loss is the mean over the counted
tokens (Keras' `"mean_with_sample_weight"` reduction), the accuracy is over the same tokens.

Also here, for any model: `remat_scope` and the per-epoch checkpoints (`save_checkpoint`,
`restore_checkpoint`, `EpochCheckpoint`). `gemma_keras.finetune` puts them together.

Example:
>>> model.compile()                                    # AdamW, masked loss and accuracy
>>> model.compile(optimizer=adamw(model, learning_rate=1e-3, gradient_accumulation_steps=4))
>>> model.fit(dataset, epochs=1)
"""

from __future__ import annotations

import glob
import json
import os

import keras
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from gemma_keras.atomic_files import atomic_file
from gemma_keras.lora import has_lora

# Learning rates that work for the shipped tiny model and for Gemma fine-tunes: LoRA adapters
# start at zero and need a larger step than the pretrained weights themselves.
FULL_LEARNING_RATE = 5e-5
LORA_LEARNING_RATE = 2e-4
WEIGHT_DECAY = 0.01
NO_DECAY = ("scale",)  # RMSNorm scales


def adamw(model=None, learning_rate=None, weight_decay=WEIGHT_DECAY,
          gradient_accumulation_steps=None, clipnorm=1.0, **kwargs):
    """AdamW for Gemma: no weight decay on the RMSNorm scales, gradients clipped to norm 1.

    `learning_rate` defaults to 2e-4 when `model` has LoRA adapters and 5e-5 otherwise.
    `gradient_accumulation_steps=N` applies the averaged gradient of N batches at once
    (Keras' own accumulation), so N small batches train like one N times larger.
    """
    if learning_rate is None:
        lora = model is not None and has_lora(model)
        learning_rate = LORA_LEARNING_RATE if lora else FULL_LEARNING_RATE
    optimizer = keras.optimizers.AdamW(
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        clipnorm=clipnorm,
        gradient_accumulation_steps=gradient_accumulation_steps,
        **kwargs,
    )
    optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY))
    return optimizer


def masked_lm_loss():
    """Sparse categorical cross-entropy on logits, averaged over the weighted tokens."""
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight", name="masked_lm_loss"
    )


def masked_accuracy():
    """Next-token accuracy; as a `weighted_metrics` entry it counts only weighted tokens."""
    return TokenAccuracy(name="accuracy")


def token_matches(y_true, y_pred):
    """1.0 where the predicted token is the label: `y_pred` is logits [..., vocab] or, as the
    chunked head loss gives it, the predicted ids [...] (integers)."""
    if "int" not in keras.backend.standardize_dtype(y_pred.dtype):
        y_pred = keras.ops.argmax(y_pred, axis=-1)
    same = keras.ops.equal(keras.ops.cast(y_true, "int32"), keras.ops.cast(y_pred, "int32"))
    return keras.ops.cast(same, "float32")


@keras.saving.register_keras_serializable(package="gemma_keras")
class TokenAccuracy(keras.metrics.MeanMetricWrapper):
    """Keras' `SparseCategoricalAccuracy`, also taking predicted token ids for `y_pred`."""

    def __init__(self, name="accuracy", dtype=None):
        super().__init__(fn=token_matches, name=name, dtype=dtype)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


def is_auto(value) -> bool:
    """Whether a `compile` argument is "auto" (Gemma's default is to be used)."""
    return isinstance(value, str) and value == "auto"


def default_compile_args(model, optimizer="auto", loss="auto", weighted_metrics="auto"):
    """Replace each "auto" argument of `compile` by Gemma's default; keep the others."""
    if is_auto(optimizer):
        optimizer = adamw(model)
    if is_auto(loss):
        loss = masked_lm_loss()
    if is_auto(weighted_metrics):
        weighted_metrics = [masked_accuracy()]
    return optimizer, loss, weighted_metrics


# ------------------------------------------------------------------ remat
def remat_scope(config):
    """A `keras.RematScope` that recomputes each decoder block's activations in the backward
    pass instead of storing them (less memory for long sequences, about one more forward
    pass of compute). Build or load the model inside it:

    >>> with remat_scope(Gemma2Config.from_json_file("config.json")):
    ...     model = Gemma2CausalLM.from_pretrained(directory)

    On TensorFlow the blocks do it with `tf.recompute_grad` themselves
    (`Gemma2DecoderBlock.rematerialized_call`); on JAX with a `jax.custom_vjp` of their own
    (`decoder_block.recomputed_after_gradient`).
    """
    names = [f"decoder_block_{i}" for i in range(config.num_hidden_layers)]
    return keras.RematScope(mode="list_of_layers", layer_names=names)


# ------------------------------------------------------------- checkpoints
CHECKPOINT_PATTERN = "epoch-{:04d}.safetensors"


def save_checkpoint(model, directory, epoch, fingerprint: dict) -> str:
    """Write the trainable weights and the optimizer state after `epoch` (1-based) as
    `epoch-NNNN.safetensors` (temporary name, then renamed). For a LoRA run this is the
    adapters only; the frozen weights come from the base model when resuming."""
    tensors = {f"model/{i:05d}": np.asarray(v.numpy())
               for i, v in enumerate(model.trainable_variables)}
    tensors.update({f"optimizer/{i:05d}": np.asarray(v.numpy())
                    for i, v in enumerate(model.optimizer.variables)})
    path = os.path.join(directory, CHECKPOINT_PATTERN.format(epoch))
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={"epoch": str(epoch),
                                          "fingerprint": json.dumps(fingerprint)})
    return path


def latest_checkpoint(directory):
    """Path of the highest-epoch checkpoint in `directory`, or None."""
    paths = sorted(glob.glob(os.path.join(directory, "epoch-*.safetensors")))
    return paths[-1] if paths else None


def restore_checkpoint(model, path, fingerprint: dict) -> int:
    """Load a `save_checkpoint` file into a compiled model; return its epoch. The run's
    settings (`fingerprint`) must be those the checkpoint was written with."""
    with safe_open(path, framework="numpy") as f:
        metadata = f.metadata()
        saved = json.loads(metadata["fingerprint"])
        if saved != fingerprint:
            changed = sorted(k for k in set(saved) | set(fingerprint)
                             if saved.get(k) != fingerprint.get(k))
            raise ValueError(f"{path} was written by a run with other settings ({changed}: "
                             f"{[saved.get(k) for k in changed]} now "
                             f"{[fingerprint.get(k) for k in changed]}); use another "
                             "checkpoint directory or start over")
        model.optimizer.build(model.trainable_variables)
        for prefix, variables in (("model", model.trainable_variables),
                                  ("optimizer", model.optimizer.variables)):
            names = sorted(k for k in f.keys() if k.startswith(prefix + "/"))
            if len(names) != len(variables):
                raise ValueError(f"{path}: {len(names)} {prefix} tensors, the run has "
                                 f"{len(variables)}")
            for name, variable in zip(names, variables):
                value = f.get_tensor(name)
                if tuple(value.shape) != tuple(variable.shape):
                    raise ValueError(f"{path}: {name} has shape {value.shape}, expected "
                                     f"{tuple(variable.shape)} ({variable.path})")
                variable.assign(value)
    return int(metadata["epoch"])


class EpochCheckpoint(keras.callbacks.Callback):
    """Save a resumable checkpoint after every epoch (see `save_checkpoint`)."""

    def __init__(self, directory, fingerprint):
        super().__init__()
        self.directory, self.fingerprint = directory, fingerprint

    def on_epoch_end(self, epoch, logs=None):
        save_checkpoint(self.model, self.directory, epoch + 1, self.fingerprint)
