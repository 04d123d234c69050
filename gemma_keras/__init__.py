"""gemma-keras: Gemma 2 in Keras 3, from Hugging Face checkpoints to TFLite and TF Serving.

Public names are resolved lazily (PEP 562) so that `import gemma_keras.tflite` does not pull
in Keras or TensorFlow.
"""

from gemma_keras.lazy_names import lazy_names

__version__ = "0.1.0"

_EXPORTS = {
    "Gemma2Config": "gemma_keras.config",
    "PRESETS": "gemma_keras.config",
    "ConfigError": "gemma_keras.config",
    "Gemma2Backbone": "gemma_keras.backbone",
    "Gemma2CausalLM": "gemma_keras.causal_lm",
    "Gemma2Attention": "gemma_keras.attention",
    "Gemma2DecoderBlock": "gemma_keras.decoder_block",
    "RMSNorm": "gemma_keras.layers",
    "GemmaTokenizer": "gemma_keras.tokenizer",
    "load_hf_checkpoint": "gemma_keras.pretrained",
    "load_model": "gemma_keras.pretrained",
    "save_hf_checkpoint": "gemma_keras.converters.hf_export",
    "export_saved_model": "gemma_keras.saved_model",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
