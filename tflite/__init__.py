"""TFLite (LiteRT) export and an interpreter wrapper that needs neither TensorFlow nor Keras.

`GemmaTFLite` (the runtime: ai-edge-litert, numpy, sentencepiece) and `export_tflite` (the
exporter: TensorFlow and Keras) are resolved lazily, so importing this package, or the
runtime, never imports TensorFlow or Keras.
"""

import importlib

_EXPORTS = {
    "GemmaTFLite": "gemma_keras.tflite.runtime",
    "export_tflite": "gemma_keras.tflite.export",
    "export_tflite_variants": "gemma_keras.tflite.export",
    "QUANTIZATIONS": "gemma_keras.tflite.quantize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gemma_keras.tflite' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
