"""Hugging Face safetensors checkpoints into Keras and back, streaming one tensor at a time.

- `load_hf_checkpoint(path, dtype)`: an HF Gemma 2 directory -> `Gemma2CausalLM`.
- `save_hf_checkpoint(model, out_dir, dtype)`: the reverse, loadable by transformers.
- `convert_hf_to_keras` / `convert_keras_to_hf`: directory to directory (`gemma-keras convert`).
- `from_keras_hub(causal_lm_or_backbone)` / `to_keras_hub(model)`: keras-hub Gemma 2 models in
  memory; `convert_keras_hub_to_keras` / `convert_keras_to_keras_hub`: keras-hub preset
  directories (`gemma-keras convert PRESET OUT`, `--to keras-hub`).
"""

from gemma_keras.converters.convert import convert_hf_to_keras, convert_keras_to_hf
from gemma_keras.converters.hf_checkpoint import load_hf_checkpoint
from gemma_keras.converters.hf_export import save_hf_checkpoint
from gemma_keras.converters.keras_hub import (convert_keras_hub_to_keras,
                                              convert_keras_to_keras_hub, from_keras_hub,
                                              to_keras_hub)
from gemma_keras.converters.safetensors_io import CheckpointError

__all__ = ["CheckpointError", "convert_hf_to_keras", "convert_keras_hub_to_keras",
           "convert_keras_to_hf", "convert_keras_to_keras_hub", "from_keras_hub",
           "load_hf_checkpoint", "save_hf_checkpoint", "to_keras_hub"]
