"""Public names of a package resolved on first use (PEP 562), so that importing the package
imports none of the modules behind them: `import gemma_keras.tflite` pulls in neither Keras
nor TensorFlow, and the converters' readers do not load the converters that build models.

Example (a package's `__init__.py`):
>>> __getattr__, __dir__ = lazy_names(__name__, {"GemmaTFLite": "gemma_keras.tflite.runtime"})
"""

from __future__ import annotations

import importlib
import sys


def lazy_names(package, exports):
    """`(__getattr__, __dir__)` for `package`, whose public names `exports` maps to the
    modules that define them; a name is imported, then cached, when first read."""

    def __getattr__(name):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
