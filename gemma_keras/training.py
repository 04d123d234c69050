"""Training defaults for `Gemma2CausalLM.compile`: AdamW, masked cross-entropy, masked accuracy.

Batches are `({"token_ids", "padding_mask"}, labels, sample_weight)` (see `gemma_keras.data`):
`labels[b, t]` is the token that follows `token_ids[b, t]` and `sample_weight[b, t]` is 1 where
that token counts (response tokens; never padding). The loss is the mean over the counted
tokens (Keras' `"mean_with_sample_weight"` reduction), the accuracy is over the same tokens.

Example:
>>> model.compile()                                    # AdamW, masked loss and accuracy
>>> model.compile(optimizer=adamw(model, learning_rate=1e-3, gradient_accumulation_steps=4))
>>> model.fit(dataset, epochs=1)
"""

from __future__ import annotations

import keras

# Learning rates that work for the shipped tiny model and for Gemma fine-tunes: LoRA adapters
# start at zero and need a larger step than the pretrained weights themselves.
FULL_LEARNING_RATE = 5e-5
LORA_LEARNING_RATE = 2e-4
WEIGHT_DECAY = 0.01
NO_DECAY = ("scale",)  # RMSNorm scales


def uses_lora(model) -> bool:
    """True if any projection of `model` carries LoRA adapters."""
    return any(getattr(layer, "lora_enabled", False) for layer in model._flatten_layers())


def adamw(model=None, learning_rate=None, weight_decay=WEIGHT_DECAY,
          gradient_accumulation_steps=None, clipnorm=1.0, **kwargs):
    """AdamW for Gemma: no weight decay on the RMSNorm scales, gradients clipped to norm 1.

    `learning_rate` defaults to 2e-4 when `model` has LoRA adapters and 5e-5 otherwise.
    `gradient_accumulation_steps=N` applies the averaged gradient of N batches at once
    (Keras' own accumulation), so N small batches train like one N times larger.
    """
    if learning_rate is None:
        lora = model is not None and uses_lora(model)
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
    return keras.metrics.SparseCategoricalAccuracy(name="accuracy")


def default_compile_args(model, optimizer="auto", loss="auto", weighted_metrics="auto"):
    """Replace each "auto" argument of `compile` by Gemma's default; keep the others."""
    if isinstance(optimizer, str) and optimizer == "auto":
        optimizer = adamw(model)
    if isinstance(loss, str) and loss == "auto":
        loss = masked_lm_loss()
    if isinstance(weighted_metrics, str) and weighted_metrics == "auto":
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
    (`Gemma2DecoderBlock.rematerialized_call`); on JAX with `jax.checkpoint`.
    """
    names = [f"decoder_block_{i}" for i in range(config.num_hidden_layers)]
    return keras.RematScope(mode="list_of_layers", layer_names=names)


# ------------------------------------------------------------- checkpoints
CHECKPOINT_PATTERN = "epoch-{:04d}.safetensors"


def save_checkpoint(model, directory, epoch, fingerprint: dict) -> str:
    """Write the trainable weights and the optimizer state after `epoch` (1-based) as
    `epoch-NNNN.safetensors` (temporary name, then renamed). For a LoRA run this is the
    adapters only; the frozen weights come from the base model when resuming."""
    import json
    import os

    import numpy as np
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {f"model/{i:05d}": np.asarray(v.numpy())
               for i, v in enumerate(model.trainable_variables)}
    tensors.update({f"optimizer/{i:05d}": np.asarray(v.numpy())
                    for i, v in enumerate(model.optimizer.variables)})
    path = os.path.join(directory, CHECKPOINT_PATTERN.format(epoch))
    save_file(tensors, path + ".tmp", metadata={"epoch": str(epoch),
                                                "fingerprint": json.dumps(fingerprint)})
    os.replace(path + ".tmp", path)
    return path


def latest_checkpoint(directory):
    """Path of the highest-epoch checkpoint in `directory`, or None."""
    import glob
    import os

    paths = sorted(glob.glob(os.path.join(directory, "epoch-*.safetensors")))
    return paths[-1] if paths else None


def restore_checkpoint(model, path, fingerprint: dict) -> int:
    """Load a `save_checkpoint` file into a compiled model; return its epoch. The run's
    settings (`fingerprint`) must be those the checkpoint was written with."""
    import json

    from safetensors import safe_open

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


# --------------------------------------------------------------- finetune
def load_splits(model, data_path, sequence_length=None, validation_path=None,
                validation_split=0.1, seed=0):
    """`(train, validation)` `EncodedData` from JSONL files, encoded with `model.tokenizer`:
    the validation part is `validation_path`, else a seeded `validation_split` of the data,
    else None. Errors name a sequence length the model cannot hold."""
    from gemma_keras.data import load_jsonl

    positions = model.config.max_position_embeddings
    if sequence_length is not None and sequence_length > positions:
        raise ValueError(f"sequence_length {sequence_length} exceeds the model's "
                         f"{positions} positions")
    data = load_jsonl(data_path, model.tokenizer, sequence_length)
    if (sequence_length is None and data.sequence_length > positions
            and int(data.padding_mask.sum(1).max()) <= positions):
        # the default (the longest record rounded up to 8) capped at the model's positions
        data = load_jsonl(data_path, model.tokenizer, positions)
    if data.sequence_length > positions:
        raise ValueError(f"{data_path}: the longest record needs {data.sequence_length} "
                         f"positions, the model has {positions}")
    if validation_path:
        return data, load_jsonl(validation_path, model.tokenizer, data.sequence_length)
    if validation_split:
        return data.split(validation_split, seed=seed)
    return data, None


def write_finetuned(model, out_dir, source=None, lora_rank=None, adapter_path=None,
                    overwrite=False) -> dict:
    """Save a trained model as a gemma-keras model directory: with LoRA, the adapters go to
    `adapter_path` first and are then merged. Returns the paths written."""
    import os

    from gemma_keras import lora
    from gemma_keras.converters.keras_dir import save_model_dir

    paths = {}
    if lora_rank:
        paths["adapter"] = lora.save_lora_weights(model, adapter_path)
        lora.merge_lora(model)
    save_model_dir(model, out_dir, source=source, tokenizer_path=model.tokenizer.proto_path,
                   overwrite=overwrite)
    paths["model"] = os.fspath(out_dir)
    return paths


def finetune(model_dir, data_path, out_dir, epochs=1, batch_size=8, sequence_length=None,
             lora_rank=None, lora_alpha=None, lora_targets=None, learning_rate=None,
             validation_split=0.1, validation_path=None, checkpoint_dir=None, resume=True,
             gradient_accumulation_steps=None, dtype=None, remat=False, quantize=None, seed=0,
             overwrite=False, jit_compile="auto", run_eagerly=False, verbose=1):
    """Fine-tune a model directory on a JSONL file and write the result as a model directory.

    The model (`Gemma2CausalLM.from_pretrained(model_dir)`) trains on `data_path` (see
    `gemma_keras.data`), with LoRA when `lora_rank` is given. A validation loss is reported
    every epoch, on `validation_path` or a held-out `validation_split` of the data. After each
    epoch a checkpoint goes to `checkpoint_dir` (default `OUT_DIR.checkpoints`); a later run
    with the same settings resumes from the latest one. At the end LoRA adapters are saved
    (`checkpoint_dir/adapter.safetensors`) and merged, and the model is written to `out_dir`
    as a gemma-keras model directory that every subcommand accepts. `quantize="int8"` trains
    the LoRA adapters on int8 base weights (`model.quantize`; LoRA required); the merged
    result is a float model.

    Returns a dict with the per-epoch history and the paths written.
    """
    import os

    from gemma_keras import lora
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.config import Gemma2Config

    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite)")
    if quantize and not lora_rank:
        raise ValueError(f"quantize={quantize!r} freezes the base weights: train LoRA adapters "
                         "on them (lora_rank / --lora-rank)")
    keras.utils.set_random_seed(seed)
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{model_dir}: no config.json (not a model directory)")
    config = Gemma2Config.from_json_file(config_path)
    if remat:
        with remat_scope(config):
            model = Gemma2CausalLM.from_pretrained(model_dir, dtype=dtype)
    else:
        model = Gemma2CausalLM.from_pretrained(model_dir, dtype=dtype)
    if model.tokenizer is None:
        raise FileNotFoundError(f"{model_dir}: no tokenizer.model to encode the data with")

    train, val = load_splits(model, data_path, sequence_length, validation_path,
                             validation_split, seed)

    if quantize:
        model.quantize(quantize)
    if lora_rank:
        lora.enable_lora(model, lora_rank, alpha=lora_alpha, targets=lora_targets)
    model.compile(optimizer=adamw(model, learning_rate=learning_rate,
                                  gradient_accumulation_steps=gradient_accumulation_steps),
                  jit_compile=jit_compile, run_eagerly=run_eagerly)

    checkpoint_dir = checkpoint_dir or os.fspath(out_dir).rstrip("/") + ".checkpoints"
    fingerprint = dict(model=os.path.abspath(model_dir), data=os.path.abspath(data_path),
                       lora_rank=lora_rank, lora_alpha=lora_alpha,
                       lora_targets=list(lora.resolve_targets(lora_targets)) if lora_rank
                       else None, batch_size=batch_size, sequence_length=train.sequence_length,
                       dtype=model.dtype_policy.name, quantize=quantize)
    initial_epoch = 0
    latest = latest_checkpoint(checkpoint_dir) if resume else None
    if latest:
        initial_epoch = restore_checkpoint(model, latest, fingerprint)
        if verbose:
            print(f"resuming from {latest} (epoch {initial_epoch} done)")
    history = {}
    if initial_epoch < epochs:
        result = model.fit(
            train.tf_dataset(batch_size, seed=seed), epochs=epochs, initial_epoch=initial_epoch,
            validation_data=val.tf_dataset(batch_size, shuffle=False) if val else None,
            callbacks=[EpochCheckpoint(checkpoint_dir, fingerprint)], shuffle=False,
            verbose=verbose)
        history = {k: [float(x) for x in v] for k, v in result.history.items()}

    paths = {"checkpoints": checkpoint_dir,
             **write_finetuned(model, out_dir, source=model_dir, lora_rank=lora_rank,
                               adapter_path=os.path.join(checkpoint_dir, "adapter.safetensors"),
                               overwrite=overwrite)}
    return {"history": history, "initial_epoch": initial_epoch, "paths": paths,
            "train_examples": len(train), "validation_examples": len(val) if val else 0}
