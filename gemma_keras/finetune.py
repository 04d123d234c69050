"""`gemma-keras finetune`: fine-tune a model directory on a JSONL file and write the result as
a model directory (LoRA or full, int8 base weights optional, resumable per epoch).

The pieces it uses take any model: the compile defaults, checkpoints and remat are in
`gemma_keras.training`, the data in `gemma_keras.data`, the adapters in `gemma_keras.lora`.

Example:
>>> finetune("gemma2-2b-keras", "train.jsonl", "gemma2-2b-tuned", epochs=2, lora_rank=8)
"""

from __future__ import annotations

import contextlib
import os

import keras

from gemma_keras import lora
from gemma_keras.causal_lm import Gemma2CausalLM
from gemma_keras.config import Gemma2Config
from gemma_keras.converters.keras_dir import save_model_dir
from gemma_keras.data import load_jsonl
from gemma_keras.tokenizer import tokenizer_of
from gemma_keras.training import (EpochCheckpoint, adamw, latest_checkpoint, remat_scope,
                                  restore_checkpoint)


def load_splits(model, data_path, sequence_length=None, validation_path=None,
                validation_split=0.1, seed=0):
    """`(train, validation)` `EncodedData` from JSONL files, encoded with `model.tokenizer`:
    the validation part is `validation_path`, else a seeded `validation_split` of the data,
    else None. Errors name a sequence length the model cannot hold."""
    tokenizer = tokenizer_of(model, "encoding the training data")
    positions = model.config.max_position_embeddings
    if sequence_length is not None and sequence_length > positions:
        raise ValueError(f"sequence_length {sequence_length} exceeds the model's "
                         f"{positions} positions")
    data = load_jsonl(data_path, tokenizer, sequence_length)
    if (sequence_length is None and data.sequence_length > positions
            and int(data.padding_mask.sum(1).max()) <= positions):
        # the default (the longest record rounded up to 8) capped at the model's positions
        data = load_jsonl(data_path, tokenizer, positions)
    if data.sequence_length > positions:
        raise ValueError(f"{data_path}: the longest record needs {data.sequence_length} "
                         f"positions, the model has {positions}")
    if validation_path:
        return data, load_jsonl(validation_path, tokenizer, data.sequence_length)
    if validation_split:
        return data.split(validation_split, seed=seed)
    return data, None


def write_finetuned(model, out_dir, source=None, lora_rank=None, adapter_path=None,
                    overwrite=False) -> dict:
    """Save a trained model as a gemma-keras model directory: with LoRA, the adapters go to
    `adapter_path` first and are then merged. Returns the paths written."""
    paths = {}
    if lora_rank:
        paths["adapter"] = lora.save_lora_weights(model, adapter_path)
        model.merge_lora()
    save_model_dir(model, out_dir, source=source, overwrite=overwrite)
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
    the LoRA adapters on int8 base weights (`from_pretrained(quantize=...)`: a Hugging Face
    directory is quantized as it loads; LoRA required); the merged result is a float model.

    Returns a dict with the per-epoch history and the paths written.
    """
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
    with remat_scope(config) if remat else contextlib.nullcontext():
        model = Gemma2CausalLM.from_pretrained(model_dir, dtype=dtype, quantize=quantize)
    if model.tokenizer is None:
        raise FileNotFoundError(f"{model_dir}: no tokenizer.model to encode the data with")

    train, val = load_splits(model, data_path, sequence_length, validation_path,
                             validation_split, seed)

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
