"""TFLite (LiteRT) export and an interpreter wrapper that needs neither TensorFlow nor Keras.

`GemmaTFLite` (the runtime: ai-edge-litert, numpy, sentencepiece) and `export_tflite` (the
exporter: TensorFlow and Keras) are resolved lazily, so importing this package, or the
runtime, never imports TensorFlow or Keras.
"""

from gemma_keras.lazy_names import lazy_names

_EXPORTS = {
    "GemmaTFLite": "gemma_keras.tflite.runtime",
    "export_tflite": "gemma_keras.tflite.export",
    "export_tflite_variants": "gemma_keras.tflite.export",
    "QUANTIZATIONS": "gemma_keras.tflite.quantize",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
