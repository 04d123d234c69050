"""Subcommands of `gemma-keras`; each module defines `register(subparsers)`.

Modules here import heavy libraries (Keras, TensorFlow) inside their `func`, not at import
time, so that `gemma-keras --help` is fast.
"""
