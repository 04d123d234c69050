"""Gemma 2 with its (tied) language-model head: token ids in, next-token logits out."""

from __future__ import annotations

import os

import keras
from keras import ops

from gemma_keras import generation, head_loss, lora, quantization, training
from gemma_keras.backbone import Gemma2Backbone
from gemma_keras.converters.files import TOKENIZER_NAME
from gemma_keras.converters.keras_dir import open_pretrained
from gemma_keras.converters.streaming import zeros_initializers
from gemma_keras.layers import _PACKAGE, soft_cap
from gemma_keras.tokenizer import GemmaTokenizer


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Gemma2CausalLM(keras.Model):
    """Gemma 2 causal language model.

    `Gemma2CausalLM(backbone)` takes a `Gemma2Backbone`, or anything a backbone is built
    from: a `Gemma2Config`, a dict of its fields, or a preset name (weights random).
    Called on `{"token_ids": int [B, T], "padding_mask": [B, T]}` it returns float32 logits
    [B, T, vocab]: the hidden states projected on the tied embedding, then soft-capped.

    `model.tokenizer` is the `GemmaTokenizer` that travels with the model (None without one):
    `from_pretrained` sets it from the directory's tokenizer.model, and `model.save("x.keras")`
    stores it in the file's assets, so that `keras.saving.load_model` restores it.

    Example:
    >>> lm = Gemma2CausalLM(Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
    ...     query_pre_attn_scalar=8))
    >>> lm({"token_ids": np.array([[2, 5]]), "padding_mask": np.array([[1, 1]])}).shape
    (1, 2, 64)
    """

    def __init__(self, backbone, dtype=None, tokenizer=None, **kwargs):
        if not isinstance(backbone, Gemma2Backbone):
            backbone = Gemma2Backbone(backbone, dtype=dtype)
        super().__init__(dtype=backbone.dtype_policy, **kwargs)
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.built = True

    @classmethod
    def empty(cls, config, dtype=None, tokenizer=None):
        """A model of `config` whose weights are zeros, ready to be filled (no random
        initializers run: at 2B they take minutes)."""
        with zeros_initializers():
            return cls(config, dtype=dtype, tokenizer=tokenizer)

    @property
    def config(self):
        return self.backbone.config

    def build(self, input_shape=None):
        """Weights are created with the backbone; nothing is left to build."""

    def call(self, inputs, training=False):
        """Logits [B, T, vocab]; in a training step whose loss is the chunked head loss
        (`gemma_keras.head_loss`: the default loss with a frozen head), the final hidden
        states instead, as `{"hidden_states": [B, T, hidden]}`."""
        hidden = self.backbone(inputs)
        if training and head_loss.applies(self):
            return {head_loss.HIDDEN_STATES: hidden}
        return self.logits(hidden)

    def logits(self, hidden):
        """Project hidden states on the tied embedding and apply the final soft-cap (float32)."""
        logits = ops.cast(self.backbone.embed_tokens.attend(hidden), "float32")
        return soft_cap(logits, self.config.final_logit_softcapping)

    # ------------------------------------------------------------ generation
    def generate(self, prompts, **kwargs):
        """Generate text or token ids; see `gemma_keras.generation.generate`."""
        return generation.generate(self, prompts, **kwargs)

    def stream(self, prompt, **kwargs):
        """Yield generated pieces as they are produced; see `gemma_keras.generation.stream`."""
        return generation.stream(self, prompt, **kwargs)

    # ------------------------------------------------------------- training
    def compile(self, optimizer="auto", loss="auto", weighted_metrics="auto", **kwargs):
        """Keras `compile` with Gemma defaults for every "auto" argument (AdamW, masked
        sparse cross-entropy on logits, masked accuracy); see `gemma_keras.training`."""
        defaults = training.is_auto(loss) and training.is_auto(weighted_metrics)
        optimizer, loss, weighted_metrics = training.default_compile_args(
            self, optimizer, loss, weighted_metrics
        )
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics,
                        **kwargs)
        # With the default loss and metric, a frozen head trains through the chunked head
        # loss (`gemma_keras.head_loss`).
        self._chunked_head_loss = defaults

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Keras' loss, or the chunked head loss when the training call returned hidden
        states (see `call`); it leaves the predicted ids in `y_pred` for the accuracy."""
        if not isinstance(y_pred, dict):
            return super().compute_loss(x, y, y_pred, sample_weight, training)
        loss, y_pred[head_loss.PREDICTIONS] = head_loss.lm_loss_and_predictions(
            self, y_pred[head_loss.HIDDEN_STATES], y, sample_weight)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Keras' metrics, on the predicted ids after the chunked head loss."""
        if isinstance(y_pred, dict):
            y_pred = y_pred[head_loss.PREDICTIONS]
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def enable_lora(self, rank, alpha=None, targets=None):
        """Add LoRA adapters and freeze everything else; see `gemma_keras.lora`."""
        return lora.enable_lora(self, rank, alpha=alpha, targets=targets)

    def merge_lora(self):
        """Fold the LoRA adapters into the base weights and make the model a plain float
        Gemma 2 again (a quantized one is dequantized); see `gemma_keras.lora`."""
        if not lora.has_lora(self):
            raise ValueError("merge_lora: the model has no LoRA adapters")
        quantization.dequantize(self)
        return lora.merge_adapters(self)

    # --------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, directory, dtype=None, quantize=None, progress=False):
        """Load a `gemma-keras convert` directory (or a Hugging Face Gemma 2 directory,
        converted in memory), its tokenizer.model as `model.tokenizer`.

        `dtype` is the Keras dtype policy (default: the dtype the weights were saved in;
        float32 for a Hugging Face directory). `quantize` ("int8" or "int4", per channel)
        stores the projections and the tied embedding as `model.quantize` does; from a
        Hugging Face directory every tensor is quantized as it streams in, so the load never
        holds the float weights (the 2B in int8: 2.6 GB instead of 10.5).

        Example:
        >>> model = Gemma2CausalLM.from_pretrained("gemma2-2b-keras")
        >>> model.tokenizer.decode(model.tokenizer.encode("hello"))
        'hello'
        """
        return cls.from_files(open_pretrained(directory), dtype=dtype, quantize=quantize,
                              progress=progress)

    @classmethod
    def from_files(cls, files, dtype=None, quantize=None, progress=False):
        """Build a model from opened `PretrainedFiles` (`gemma_keras.converters.files`) and
        stream its weights in (quantized with `quantize`, see `from_pretrained`)."""
        dtype = dtype or files.dtype
        if quantize is not None:
            quantization.check_mode(files.directory, quantize)
        if quantize is not None and files.fills_quantized:
            dtype = quantization.quantized_dtype(quantize, dtype)
        model = cls.empty(files.config, dtype=dtype, tokenizer=files.tokenizer)
        files.fill(model, progress=progress)
        if quantize is not None and not files.fills_quantized:
            quantization.quantize_model(model, quantize)
        return model

    # ------------------------------------------------------------ saving
    def save_assets(self, dir_path):
        """Keras' saving hook: `model.save("x.keras")` stores the tokenizer as an asset."""
        if self.tokenizer is not None:
            self.tokenizer.save_proto(os.path.join(dir_path, TOKENIZER_NAME))

    def load_assets(self, dir_path):
        """Keras' loading hook: the tokenizer saved by `save_assets` travels back."""
        path = os.path.join(dir_path, TOKENIZER_NAME)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                self.tokenizer = GemmaTokenizer.from_proto(
                    f.read(), name=f"{TOKENIZER_NAME} (saved with the model)")

    def get_config(self):
        """The backbone, and the LoRA adapters' shape when enabled (so that a `.keras` file
        saved mid-fine-tune reloads with its adapters, and the base weights frozen)."""
        base = super().get_config()
        base.pop("dtype", None)
        config = {**base, "backbone": keras.saving.serialize_keras_object(self.backbone)}
        if lora.has_lora(self):
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
