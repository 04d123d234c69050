"""TensorFlow Serving export pieces: the serving module, in-graph sampling and tokenizer.

The public entry point is `gemma_keras.saved_model.export_saved_model`.
"""
