"""The Keras model against transformers' Gemma2ForCausalLM on the same random weights."""

import numpy as np

from conftest import torch_logits
from gemma_keras.converters import load_hf_checkpoint


def test_logits_match_transformers(hf_model, hf_checkpoint, padded_batch):
    ids, mask = padded_batch
    model = load_hf_checkpoint(hf_checkpoint)
    ours = np.asarray(model({"token_ids": ids, "padding_mask": mask}))
    ref = torch_logits(hf_model, ids, mask)
    valid = mask.astype(bool)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)
