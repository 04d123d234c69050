"""`Gemma2CausalLM.from_pretrained`: load a model directory, tokenizer attached."""

from __future__ import annotations


def load(directory, dtype=None):
    """Load a `gemma-keras convert` output directory as a `Gemma2CausalLM`.

    Args:
      directory: a gemma-keras model directory (config.json, Keras weights, metadata.json,
        tokenizer.model). A Hugging Face Gemma 2 directory (config.json + safetensors) is
        also accepted and converted in memory.
      dtype: Keras dtype policy (default: the dtype the weights were saved in; float32 for a
        Hugging Face directory).

    `model.tokenizer` is a `GemmaTokenizer` when the directory has a tokenizer.model.

    Example:
    >>> model = Gemma2CausalLM.from_pretrained("gemma2-2b-keras")
    >>> model.tokenizer.decode(model.tokenizer.encode("hello"))
    'hello'
    """
    from pathlib import Path

    from gemma_keras.converters.hf_checkpoint import load_hf_checkpoint
    from gemma_keras.converters.keras_dir import is_model_dir, load_model_dir

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    if not is_model_dir(directory) and any(directory.glob("*.safetensors")):
        return load_hf_checkpoint(directory, dtype=dtype)
    return load_model_dir(directory, dtype=dtype)
