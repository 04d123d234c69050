"""Hugging Face safetensors checkpoints into Keras and back, streaming one tensor at a time.

- `load_hf_checkpoint(path, dtype)`: an HF Gemma 2 directory -> `Gemma2CausalLM`.
- `save_hf_checkpoint(model, out_dir, dtype)`: the reverse, loadable by transformers.
- `convert_hf_to_keras` / `convert_keras_to_hf`: directory to directory (`gemma-keras convert`).
- `from_keras_hub(causal_lm_or_backbone)` / `to_keras_hub(model)`: keras-hub Gemma 2 models in
  memory; `convert_keras_hub_to_keras` / `convert_keras_to_keras_hub`: keras-hub preset
  directories (`gemma-keras convert PRESET OUT`, `--to keras-hub`).

The names are resolved lazily (PEP 562): the readers in this package sit below
`gemma_keras.causal_lm` (which imports them for `from_pretrained`), the converters that build
models above it, so importing one module here never imports the others.
"""

from gemma_keras.lazy_names import lazy_names

_EXPORTS = {
    "CheckpointError": "gemma_keras.converters.safetensors_io",
    "convert_hf_to_keras": "gemma_keras.converters.convert",
    "convert_keras_to_hf": "gemma_keras.converters.convert",
    "load_hf_checkpoint": "gemma_keras.pretrained",
    "save_hf_checkpoint": "gemma_keras.converters.hf_export",
    "convert_keras_hub_to_keras": "gemma_keras.converters.keras_hub",
    "convert_keras_to_keras_hub": "gemma_keras.converters.keras_hub",
    "from_keras_hub": "gemma_keras.converters.keras_hub",
    "to_keras_hub": "gemma_keras.converters.keras_hub",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
