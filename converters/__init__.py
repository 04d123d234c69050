"""Hugging Face safetensors checkpoints into Keras and back."""

from gemma_keras.converters.hf_checkpoint import CheckpointError, load_hf_checkpoint

__all__ = ["CheckpointError", "load_hf_checkpoint"]
