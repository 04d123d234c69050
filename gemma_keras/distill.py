"""Knowledge distillation between Gemma 2 models, on Keras' `keras.distillation`.

A `GemmaDistiller` (Keras' `Distiller`) trains a student `Gemma2CausalLM` to match a frozen
teacher's next-token distributions on the same tokens, mixed with the ordinary label loss:

    loss = w * masked_lm_loss(labels, student) + (1 - w) * T^2 * KL(softmax(teacher / T) ||
                                                                  softmax(student / T))

with `w = student_loss_weight` and `T = temperature`. Both terms average over the trained
tokens only (`sample_weight` from `gemma_keras.data`: response tokens, never padding), so the
data, masks, LoRA and optimizer are those of `model.fit` fine-tuning. Teacher and student share
the tokenizer (same vocabulary); their sizes may differ.

Example:
>>> student = Gemma2CausalLM(student_config)          # or from_pretrained, or LoRA-enabled
>>> distiller = GemmaDistiller(teacher, student, temperature=1.0, student_loss_weight=0.5)
>>> distiller.compile()                               # AdamW for the student, masked losses
>>> distiller.fit(data.tf_dataset(8), epochs=1)       # history: total, student, distillation
>>> distiller.student.generate("...")
"""

from __future__ import annotations

import os

import keras
from keras import ops

from gemma_keras import lora
from gemma_keras.causal_lm import Gemma2CausalLM
from gemma_keras.config import Gemma2Config
from gemma_keras.finetune import load_splits, write_finetuned
from gemma_keras.layers import _PACKAGE
from gemma_keras.training import adamw, default_compile_args

DEFAULT_TEMPERATURE = 1.0
DEFAULT_STUDENT_LOSS_WEIGHT = 0.5


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TokenLogitsDistillation(keras.distillation.LogitsDistillation):
    """`LogitsDistillation` for language models: the KL divergence at temperature T (times
    T^2) of each token's next-token distribution, averaged over the tokens `sample_weight`
    counts. Computed from log-softmax (float32), so it stays finite for 256000-way vocabularies.
    """

    def __init__(self, temperature=DEFAULT_TEMPERATURE):
        super().__init__(temperature=temperature, loss="kl_divergence")

    def compute_loss(self, teacher_outputs, student_outputs, sample_weight=None, **kwargs):
        t = float(self.temperature)
        teacher = ops.log_softmax(ops.cast(teacher_outputs, "float32") / t, axis=-1)
        student = ops.log_softmax(ops.cast(student_outputs, "float32") / t, axis=-1)
        per_token = ops.sum(ops.exp(teacher) * (teacher - student), axis=-1) * (t * t)
        if sample_weight is None:
            return ops.mean(per_token)
        weight = ops.cast(sample_weight, "float32")
        return ops.sum(per_token * weight) / ops.maximum(ops.sum(weight), 1.0)

    def get_config(self):
        return {"temperature": self.temperature}

    @classmethod
    def from_config(cls, config):
        return cls(temperature=config["temperature"])


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GemmaDistiller(keras.distillation.Distiller):
    """Keras' `Distiller` for Gemma 2 causal LMs, with the label loss and the distillation
    loss both masked by the batches' `sample_weight` (Keras' `Distiller` averages over every
    position, padding and prompt included).

    `fit` reports `total_loss`, `student_loss` and `distillation_loss` (and `accuracy`, the
    student's masked next-token accuracy). The teacher is frozen; the student trains whatever
    is trainable in it (all weights, or only its LoRA adapters after `enable_lora`).
    """

    def __init__(self, teacher, student, temperature=DEFAULT_TEMPERATURE,
                 student_loss_weight=DEFAULT_STUDENT_LOSS_WEIGHT, **kwargs):
        _check_pair(teacher, student)
        kwargs.pop("distillation_losses", None)
        super().__init__(teacher=teacher, student=student,
                         distillation_losses=TokenLogitsDistillation(temperature),
                         student_loss_weight=student_loss_weight, **kwargs)
        self.temperature = temperature

    def compile(self, optimizer="auto", loss="auto", weighted_metrics="auto", **kwargs):
        """Keras `compile` with Gemma's defaults for every "auto" argument: AdamW for the
        student (`gemma_keras.training.adamw`), masked cross-entropy, masked accuracy."""
        optimizer, loss, weighted_metrics = default_compile_args(
            self.student, optimizer, loss, weighted_metrics)
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics,
                        **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        student_loss = 0.0
        if self.student_loss_weight > 0.0 and y is not None:
            student_loss = self._student_loss(y, y_pred, sample_weight=sample_weight)
        distillation_loss = 0.0
        if self.student_loss_weight < 1.0:
            teacher_logits = ops.stop_gradient(self.teacher(x, training=False))
            distillation_loss = self.distillation_losses[0].compute_loss(
                teacher_logits, y_pred, sample_weight=sample_weight)
        w = self.student_loss_weight
        total = w * student_loss + (1.0 - w) * distillation_loss
        self.student_loss_tracker.update_state(student_loss)
        self.distillation_loss_tracker.update_state(distillation_loss)
        self.total_loss_tracker.update_state(total)
        return total

    def get_config(self):
        config = super().get_config()
        config.pop("distillation_losses", None)
        config.pop("distillation_loss_weights", None)
        return {**config, "temperature": self.temperature}


def _check_pair(teacher, student):
    """Teacher and student must read the same token ids: same vocabulary size."""
    for role, model in (("teacher", teacher), ("student", student)):
        if not hasattr(model, "config") or not hasattr(model.config, "vocab_size"):
            raise ValueError(f"the {role} must be a Gemma2CausalLM, got {type(model).__name__}")
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"teacher and student must share a tokenizer: the teacher's vocabulary "
                         f"has {teacher.config.vocab_size} ids, the student's "
                         f"{student.config.vocab_size}")


def load_student(student, teacher, dtype=None):
    """The student: a model directory (loaded), a config.json path, or a `Gemma2Config` /
    dict (randomly initialised); it takes the teacher's tokenizer."""
    if isinstance(student, (str, os.PathLike)) and os.path.isdir(student):
        model = Gemma2CausalLM.from_pretrained(student, dtype=dtype)
    else:
        if isinstance(student, (str, os.PathLike)):
            if not os.path.isfile(student):
                raise FileNotFoundError(f"student {student}: neither a model directory nor a "
                                        "config.json file")
            student = Gemma2Config.from_json_file(student)
        model = Gemma2CausalLM(student, dtype=dtype)
    _check_pair(teacher, model)
    model.tokenizer = teacher.tokenizer
    return model


def distill(teacher_dir, student, data_path, out_dir, epochs=1, batch_size=8,
            sequence_length=None, temperature=DEFAULT_TEMPERATURE,
            student_loss_weight=DEFAULT_STUDENT_LOSS_WEIGHT, lora_rank=None, lora_alpha=None,
            lora_targets=None, learning_rate=None, validation_split=0.1, validation_path=None,
            dtype=None, seed=0, overwrite=False, jit_compile="auto", run_eagerly=False,
            verbose=1):
    """Distil the teacher model directory into `student` on a JSONL file and write the student
    to `out_dir` as a gemma-keras model directory (LoRA adapters, if any, merged).

    `student` is a model directory or a config.json (a new, randomly initialised model; its
    vocabulary must be the teacher's). The data pipeline is `gemma_keras.finetune.finetune`'s.
    Returns a dict with the per-epoch history and the paths written.
    """
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite)")
    keras.utils.set_random_seed(seed)
    teacher = Gemma2CausalLM.from_pretrained(teacher_dir, dtype=dtype)
    if teacher.tokenizer is None:
        raise FileNotFoundError(f"{teacher_dir}: no tokenizer.model to encode the data with")
    model = load_student(student, teacher, dtype=dtype)
    train, val = load_splits(model, data_path, sequence_length, validation_path,
                             validation_split, seed)
    if lora_rank:
        lora.enable_lora(model, lora_rank, alpha=lora_alpha, targets=lora_targets)
    distiller = GemmaDistiller(teacher, model, temperature=temperature,
                               student_loss_weight=student_loss_weight)
    distiller.compile(optimizer=adamw(model, learning_rate=learning_rate),
                      jit_compile=jit_compile, run_eagerly=run_eagerly)
    result = distiller.fit(
        train.tf_dataset(batch_size, seed=seed), epochs=epochs, shuffle=False, verbose=verbose,
        validation_data=val.tf_dataset(batch_size, shuffle=False) if val else None)
    source = student if isinstance(student, (str, os.PathLike)) else None
    paths = write_finetuned(model, out_dir, source=source, lora_rank=lora_rank,
                            adapter_path=os.fspath(out_dir).rstrip("/") + ".adapter.safetensors",
                            overwrite=overwrite)
    return {"history": {k: [float(v) for v in vs] for k, vs in result.history.items()},
            "paths": paths, "train_examples": len(train),
            "validation_examples": len(val) if val else 0}
