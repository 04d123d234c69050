"""Gemma 2 with its (tied) language-model head: token ids in, next-token logits out."""

from __future__ import annotations

import keras
from keras import ops

from gemma_keras.backbone import Gemma2Backbone
from gemma_keras.layers import _PACKAGE, soft_cap


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Gemma2CausalLM(keras.Model):
    """Gemma 2 causal language model.

    `Gemma2CausalLM(backbone)` takes a `Gemma2Backbone`, or anything a backbone is built
    from: a `Gemma2Config`, a dict of its fields, or a preset name (weights random).
    Called on `{"token_ids": int [B, T], "padding_mask": [B, T]}` it returns float32 logits
    [B, T, vocab]: the hidden states projected on the tied embedding, then soft-capped.

    Example:
    >>> lm = Gemma2CausalLM(Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    ...     query_pre_attn_scalar=8))
    >>> lm({"token_ids": np.array([[2, 5]]), "padding_mask": np.array([[1, 1]])}).shape
    (1, 2, 64)
    """

    def __init__(self, backbone, dtype=None, **kwargs):
        if not isinstance(backbone, Gemma2Backbone):
            backbone = Gemma2Backbone(backbone, dtype=dtype)
        super().__init__(dtype=backbone.dtype_policy, **kwargs)
        self.backbone = backbone
        self.tokenizer = None  # attached by from_pretrained / the converters
        self.built = True

    @property
    def config(self):
        return self.backbone.config

    def build(self, input_shape=None):
        """Weights are created with the backbone; nothing is left to build."""

    def call(self, inputs):
        return self.logits(self.backbone(inputs))

    def logits(self, hidden):
        """Project hidden states on the tied embedding and apply the final soft-cap (float32)."""
        logits = ops.cast(self.backbone.embed_tokens.attend(hidden), "float32")
        return soft_cap(logits, self.config.final_logit_softcapping)

    # ------------------------------------------------------------ generation
    def generate(self, prompts, **kwargs):
        """Generate text or token ids; see `gemma_keras.generation.generate`."""
        from gemma_keras import generation

        return generation.generate(self, prompts, **kwargs)

    def stream(self, prompt, **kwargs):
        """Yield generated pieces as they are produced; see `gemma_keras.generation.stream`."""
        from gemma_keras import generation

        return generation.stream(self, prompt, **kwargs)

    # ------------------------------------------------------------- training
    def compile(self, optimizer="auto", loss="auto", weighted_metrics="auto", **kwargs):
        """Keras `compile` with Gemma defaults for every "auto" argument (AdamW, masked
        sparse cross-entropy on logits, masked accuracy); see `gemma_keras.training`."""
        from gemma_keras import training

        optimizer, loss, weighted_metrics = training.default_compile_args(
            self, optimizer, loss, weighted_metrics
        )
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics,
                        **kwargs)

    def enable_lora(self, rank, alpha=None, targets=None):
        """Add LoRA adapters and freeze everything else; see `gemma_keras.lora`."""
        from gemma_keras import lora

        return lora.enable_lora(self, rank, alpha=alpha, targets=targets)

    def merge_lora(self):
        """Fold the LoRA adapters into the base weights; see `gemma_keras.lora`."""
        from gemma_keras import lora

        return lora.merge_lora(self)

    # --------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, directory, dtype=None):
        """Load a `gemma-keras convert` directory, tokenizer attached; see
        `gemma_keras.pretrained`."""
        from gemma_keras import pretrained

        return pretrained.load(directory, dtype=dtype)

    def get_config(self):
        """The backbone, and the LoRA adapters' shape when enabled (so that a `.keras` file
        saved mid-fine-tune reloads with its adapters, and the base weights frozen)."""
        from gemma_keras import lora

        base = super().get_config()
        base.pop("dtype", None)
        config = {**base, "backbone": keras.saving.serialize_keras_object(self.backbone)}
        if lora.enabled_lora_layers(self):
            config["lora"] = lora.lora_spec(self)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        lora_spec = config.pop("lora", None)
        model = cls(**config)
        if lora_spec:
            model.enable_lora(**lora_spec)
        return model
