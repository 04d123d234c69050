"""GemmaTokenizer: special ids, encode/decode, chat template, tf.data/in-graph use, training."""

import numpy as np
import pytest
import sentencepiece as spm

from conftest import TINY_HF_CONFIG
from gemma_keras.tokenizer import GemmaTokenizer, train_sentencepiece

TEXT = "hello world the cat sat on a mat"


def test_special_ids_land_where_gemma_has_them(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.vocab_size == TINY_HF_CONFIG["vocab_size"]
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (106, 107)
    pieces = [tok.id_to_piece(i) for i in (0, 1, 2, 3, 106, 107, 108)]
    assert pieces == ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n"]
    # the raw SentencePiece model agrees (no hidden remapping in the wrapper)
    sp = spm.SentencePieceProcessor(model_file=tok.proto_path)
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)


def test_encode_decode_roundtrip_with_bos(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.encode(TEXT)
    assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
    assert tok.encode(TEXT, add_bos=False) == ids[1:]
    assert 3 not in ids  # no unknowns for in-vocabulary text
    assert tok.decode(ids) == TEXT
    assert tok.decode([0, 0, *ids, 1]) == TEXT  # pad, bos, eos skipped
    assert tok(["a", "b"]) == [tok.encode("a"), tok.encode("b")]


def test_chat_template_is_gemma_turn_format(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi you"},
        {"role": "user", "content": "who are you?"},
    ]
    text = tok.apply_chat_template(messages)
    assert text == (
        "<start_of_turn>user\nhello<end_of_turn>\n"
        "<start_of_turn>model\nhi you<end_of_turn>\n"
        "<start_of_turn>user\nwho are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert tok.apply_chat_template(messages[:1], add_generation_prompt=False) == (
        "<start_of_turn>user\nhello<end_of_turn>\n"
    )
    ids = tok.encode(text)
    user = tok.encode("user", add_bos=False)
    assert ids[:2] == [2, 106] and ids[2:2 + len(user)] == user
    assert ids.count(106) == 4 and ids.count(107) == 3 and ids[-1] == 108
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("messages, match", [
    ([{"role": "system", "content": "x"}], "system"),
    ([{"role": "bot", "content": "x"}], "role 'bot'"),
    ([{"content": "x"}], "'role' and 'content'"),
    ([{"role": "user", "content": 3}], "content must be a str"),
])
def test_chat_template_rejects_bad_messages(tiny_tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        tiny_tokenizer.apply_chat_template(messages)


def test_matches_keras_hub_gemma_tokenizer(tiny_tokenizer):
    import keras_hub

    hub = keras_hub.models.GemmaTokenizer(proto=tiny_tokenizer.proto_path)
    for text in (TEXT, "who is the big red dog?", tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": "hello"}])):
        assert np.asarray(hub(text)).tolist() == tiny_tokenizer.encode(text, add_bos=False)


def test_in_graph_and_tf_data(tiny_tokenizer):
    import tensorflow as tf

    tok = tiny_tokenizer
    texts = [TEXT, "yes no", "who is it?"]
    ragged = tf.function(tok.tf_encode)(tf.constant(texts))
    assert ragged.to_list() == [tok.encode(t) for t in texts]
    scalar = tok.tf_encode(tf.constant("yes no"), add_bos=False)
    assert scalar.numpy().tolist() == tok.encode("yes no", add_bos=False)

    ds = tf.data.Dataset.from_tensor_slices(texts).map(tok.tf_encode)
    assert [x.numpy().tolist() for x in ds] == [tok.encode(t) for t in texts]

    padded = ragged.to_tensor(default_value=tok.pad_id)  # dense with pads: pads dropped
    decoded = [s.decode() for s in tok.tf_decode(padded).numpy()]
    assert decoded == texts


def test_bad_files_and_ids(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="nothere.model"):
        GemmaTokenizer(tmp_path / "nothere.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model"):
        GemmaTokenizer(junk)
    with pytest.raises(ValueError, match=r"\[0, 160\)"):
        tiny_tokenizer.decode([5, 160])
    with pytest.raises(TypeError, match="str"):
        tiny_tokenizer.encode(123)


def test_non_gemma_model_is_refused(tmp_path):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world the cat"] * 50), model_prefix=str(tmp_path / "plain"),
        vocab_size=15, minloglevel=2,
    )
    with pytest.raises(ValueError, match="too small|not a Gemma tokenizer"):
        GemmaTokenizer(tmp_path / "plain.model")


def test_train_sentencepiece_validates_and_accepts_generators(tmp_path):
    with pytest.raises(ValueError, match="more than 109"):
        train_sentencepiece(["a b"], tmp_path / "x", vocab_size=100)
    path = train_sentencepiece((f"hello world {w}" for w in "abcdefgh" * 20), tmp_path / "gen",
                               vocab_size=122)
    tok = GemmaTokenizer(path)
    assert tok.vocab_size == 122 and tok.decode(tok.encode("hello a")) == "hello a"


def test_from_proto_and_save_proto(tmp_path, tiny_tokenizer):
    """A tokenizer built from the model's bytes (as a `.keras` file restores it) is the same
    tokenizer, and `save_proto` writes those bytes back."""
    proto = open(tiny_tokenizer.proto_path, "rb").read()
    tok = GemmaTokenizer.from_proto(proto, name="in memory")
    assert tok.proto == tiny_tokenizer.proto == proto and tok.proto_path is None
    assert tok.encode(TEXT) == tiny_tokenizer.encode(TEXT)
    path = tok.save_proto(tmp_path / "sub" / "tokenizer.model")
    assert open(path, "rb").read() == proto
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["tokenizer.model"]
    with pytest.raises(ValueError, match="in memory is not a SentencePiece model"):
        GemmaTokenizer.from_proto(b"not a model", name="in memory")


def test_tokenizer_of_names_what_needs_it(tiny_tokenizer):
    from gemma_keras.tokenizer import tokenizer_of

    class Holder:
        tokenizer = None

    with pytest.raises(ValueError, match="scoring needs a tokenizer"):
        tokenizer_of(Holder(), "scoring")
    Holder.tokenizer = tiny_tokenizer
    assert tokenizer_of(Holder(), "scoring") is tiny_tokenizer
