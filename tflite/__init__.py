"""TFLite (LiteRT) export and an interpreter wrapper that needs neither TensorFlow nor Keras."""
