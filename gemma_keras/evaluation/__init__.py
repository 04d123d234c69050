"""Evaluate a Gemma 2 model on every runtime: perplexity, agreement with a float reference
(KL divergence, top-1), multiple choice, and EleutherAI's lm-evaluation-harness.

One scoring interface (`scorers.Scorer`) is implemented for a Keras model, a `.tflite` export
(through `GemmaTFLite`, no TensorFlow) and a SavedModel (through its `score` signature); the
metrics are written once over it. See docs/evaluation.md.
"""
