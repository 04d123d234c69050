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
    """True if any Dense layer of `model` carries LoRA adapters."""
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
