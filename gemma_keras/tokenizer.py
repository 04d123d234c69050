"""Gemma's SentencePiece tokenizer: encode/decode, the chat template, in-graph use, training.

This module imports only `sentencepiece` at load time, so the TFLite runtime can use it
without TensorFlow or Keras. The TensorFlow pieces (`tf_tokenizer`, `tf_encode`,
`tf_decode`) import tensorflow-text when first used.

Gemma's special ids and turn format are in `gemma_keras.conventions`.
"""

from __future__ import annotations

import io
import os

import sentencepiece as spm

from gemma_keras.atomic_files import write_atomically
from gemma_keras.conventions import (
    BOS_ID,
    END_OF_TURN,
    END_OF_TURN_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_PIECES,
    START_OF_TURN,
    START_OF_TURN_ID,
    TURN_ROLES,
    UNK_ID,
    turn,
    turn_start,
)

# Gemma's reserved pieces between unk (3) and <start_of_turn> (106): ids 4..105.
_GEMMA_FILLERS = ["<mask>", "<2mass>", "[@BOS@]"] + [f"<unused{i}>" for i in range(99)]


class GemmaTokenizer:
    """A Gemma `tokenizer.model` (SentencePiece) with Gemma's special tokens.

    Example:
    >>> tok = GemmaTokenizer("tokenizer.model")
    >>> ids = tok.encode("hello")          # [2, ...]: bos first
    >>> tok.decode(ids)
    'hello'
    >>> tok.apply_chat_template([{"role": "user", "content": "hi"}])
    '<start_of_turn>user\\nhi<end_of_turn>\\n<start_of_turn>model\\n'
    """

    def __init__(self, proto_path):
        proto_path = os.fspath(proto_path)
        if not os.path.isfile(proto_path):
            raise FileNotFoundError(f"tokenizer model not found: {proto_path}")
        with open(proto_path, "rb") as f:
            self._load(f.read(), proto_path)
        self._proto_path = proto_path

    @classmethod
    def from_proto(cls, proto: bytes, name="<proto>"):
        """A tokenizer of a serialized SentencePiece model (`tokenizer.model`'s bytes); `name`
        stands for it in error messages. Its `proto_path` is None."""
        tokenizer = cls.__new__(cls)
        tokenizer._load(bytes(proto), name)
        tokenizer._proto_path = None
        return tokenizer

    def _load(self, proto, name):
        self._proto, self._name = proto, name
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{name} is not a SentencePiece model: {e}") from None
        self._check_special_ids()
        self._special_ids = {self.pad_id, self.bos_id, self.eos_id,
                             self.start_of_turn_id, self.end_of_turn_id}
        self._tf_tokenizer = None

    def _check_special_ids(self):
        expected = SPECIAL_PIECES
        if self._sp.GetPieceSize() <= END_OF_TURN_ID:
            raise ValueError(
                f"{self._name}: vocabulary of {self._sp.GetPieceSize()} pieces is too "
                f"small for Gemma's special ids (need more than {END_OF_TURN_ID})"
            )
        wrong = {i: (p, self._sp.IdToPiece(i)) for i, p in expected.items()
                 if self._sp.IdToPiece(i) != p}
        if wrong:
            detail = ", ".join(f"id {i} should be {p!r} but is {got!r}"
                               for i, (p, got) in wrong.items())
            raise ValueError(f"{self._name} is not a Gemma tokenizer: {detail}")

    # ----------------------------------------------------------------- properties
    @property
    def proto_path(self) -> str | None:
        """The file the tokenizer was read from (None for `from_proto`); `proto` and
        `save_proto` work for both."""
        return self._proto_path

    @property
    def name(self) -> str:
        """The file it was read from, or `from_proto`'s name: what messages call it."""
        return self._name

    @property
    def proto(self) -> bytes:
        """The serialized SentencePiece model (the bytes of `tokenizer.model`)."""
        return self._proto

    def save_proto(self, path) -> str:
        """Write the SentencePiece model to `path` (atomically); return the path."""
        write_atomically(path, self._proto)
        return os.fspath(path)

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    pad_id = property(lambda self: PAD_ID, doc="id of `<pad>` (0)")
    eos_id = property(lambda self: EOS_ID, doc="id of `<eos>` (1)")
    bos_id = property(lambda self: BOS_ID, doc="id of `<bos>` (2)")
    start_of_turn_id = property(lambda self: START_OF_TURN_ID, doc="id of `<start_of_turn>`")
    end_of_turn_id = property(lambda self: END_OF_TURN_ID, doc="id of `<end_of_turn>`")

    @property
    def special_ids(self) -> frozenset:
        """pad, bos, eos, `<start_of_turn>`, `<end_of_turn>`: the ids `decode` leaves out."""
        return frozenset(self._special_ids)

    # ------------------------------------------------------------- encode/decode
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, `<bos>` first unless `add_bos=False`.

        `<start_of_turn>` and `<end_of_turn>` written in the text become their ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self._sp.EncodeAsIds(text)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; pad, bos, eos and the turn markers are skipped by default."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}); got {bad[:5]}")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._sp.DecodeIds(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.PieceToId(piece)

    def __call__(self, text, add_bos: bool = True):
        """`encode` for a str, a list of id lists for a list of str."""
        if isinstance(text, str):
            return self.encode(text, add_bos=add_bos)
        return [self.encode(t, add_bos=add_bos) for t in text]

    # -------------------------------------------------------------- chat template
    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """Gemma's turn format for `[{"role": "user"|"model"|"assistant", "content": str}]`.

        Each turn is `<start_of_turn>{role}\\n{content}<end_of_turn>\\n` ("assistant" is
        written "model"); with `add_generation_prompt`, `<start_of_turn>model\\n` follows.
        `<bos>` is not included: `encode` adds it.
        """
        if isinstance(messages, dict):
            messages = [messages]
        parts = []
        for n, message in enumerate(messages):
            try:
                role, content = message["role"], message["content"]
            except (TypeError, KeyError):
                raise ValueError(
                    f"message {n} must be a dict with 'role' and 'content', got {message!r}"
                ) from None
            if role == "system":  # Gemma has no system turn: prepend to the next user turn
                raise ValueError(
                    "Gemma 2 has no 'system' role; put the instructions in the first user turn"
                )
            if role not in TURN_ROLES:
                raise ValueError(
                    f"message {n} has role {role!r}; expected 'user', 'model' or 'assistant'"
                )
            if not isinstance(content, str):
                raise ValueError(f"message {n} content must be a str, got {type(content).__name__}")
            parts.append(turn(role, content))
        if add_generation_prompt:
            parts.append(turn_start("model"))
        return "".join(parts)

    # ------------------------------------------------------------ TensorFlow use
    @property
    def tf_tokenizer(self):
        """A `tensorflow_text.SentencepieceTokenizer` on the same model (for graphs/tf.data)."""
        if self._tf_tokenizer is None:
            import tensorflow as tf
            import tensorflow_text as tf_text

            with tf.init_scope():  # eager resource, even when first used inside a tf.function
                self._tf_tokenizer = tf_text.SentencepieceTokenizer(model=self._proto,
                                                                    out_type=tf.int32)
        return self._tf_tokenizer

    def tf_encode(self, text, add_bos: bool = True):
        """In-graph `encode`: a string tensor [N] (or scalar) -> int32 RaggedTensor [N, None]
        (or a 1-D tensor). Works inside `tf.function` and `tf.data.Dataset.map`."""
        import tensorflow as tf

        ids = self.tf_tokenizer.tokenize(text)
        if not add_bos:
            return ids
        if isinstance(ids, tf.RaggedTensor):
            bos = tf.fill([ids.nrows(), 1], tf.constant(self.bos_id, tf.int32))
            return tf.concat([bos, ids], axis=1)
        return tf.concat([[self.bos_id], ids], axis=0)

    def tf_decode(self, ids):
        """In-graph `decode`: int ids (dense or ragged, [N, None] or [None]) -> strings,
        dropping pad, bos, eos and the turn markers."""
        import tensorflow as tf

        if not isinstance(ids, tf.RaggedTensor) and ids.shape.rank == 2:
            ids = tf.RaggedTensor.from_tensor(ids)
        special = tf.constant(sorted(self._special_ids), tf.int32)
        ids = tf.cast(ids, tf.int32)
        keep = tf.reduce_all(tf.not_equal(ids[..., None], special), axis=-1)
        return self.tf_tokenizer.detokenize(tf.ragged.boolean_mask(ids, keep))

    def __repr__(self):
        return f"GemmaTokenizer({self._name!r}, vocab_size={self.vocab_size})"


def tokenizer_of(model, purpose="this"):
    """The tokenizer that travels with `model` (a `Gemma2CausalLM`, a `GemmaTFLite`, a
    scorer: anything with a `.tokenizer`), or a ValueError saying that `purpose` needs one.

    This is the one place the package asks a model for its tokenizer.
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"{purpose} needs a tokenizer and the model has none: load it from a directory "
            "with a tokenizer.model (Gemma2CausalLM.from_pretrained), or set "
            "model.tokenizer = GemmaTokenizer(path)")
    return tokenizer


def stream_text(tokenizer, token_ids):
    """Yield the text of a growing sequence of `token_ids` piece by piece.

    Joined, the pieces equal `tokenizer.decode(all ids)`. A piece that would end inside a
    multi-byte character (byte fallback) is held back until the character is complete.
    """
    tokens, shown = [], ""
    for token in token_ids:
        tokens.append(token)
        text = tokenizer.decode(tokens)
        if text.endswith("\ufffd") or not text.startswith(shown):
            continue
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    text = tokenizer.decode(tokens)
    if len(text) > len(shown) and text.startswith(shown):
        yield text[len(shown):]


def train_sentencepiece(texts, out_prefix, vocab_size, model_type="unigram",
                        byte_fallback=False, **trainer_kwargs) -> str:
    """Train a small SentencePiece model with Gemma's special ids; return the `.model` path.

    `texts` is an iterable of strings (a list or a generator). The model gets pad 0, eos 1,
    bos 2, unk 3, Gemma's reserved pieces at 4..105, `<start_of_turn>` 106, `<end_of_turn>`
    107 (user-defined, so the chat template in text encodes to them), "\\n" at 108, and
    learned pieces from 109 up; `vocab_size` counts all of them and must exceed 109.
    Normalisation is Gemma's: identity, whitespace kept as is, no dummy prefix. Extra
    keyword arguments go to `sentencepiece.SentencePieceTrainer.train`.

    Example:
    >>> path = train_sentencepiece(["hello world"] * 100, "/tmp/tiny", vocab_size=118)
    >>> GemmaTokenizer(path).decode(GemmaTokenizer(path).encode("hello"))
    'hello'
    """
    reserved = END_OF_TURN_ID + 2
    if vocab_size <= reserved:
        raise ValueError(f"vocab_size must be more than {reserved} (Gemma's reserved ids), "
                         f"got {vocab_size}")
    texts = iter([texts] if isinstance(texts, str) else texts)
    out_prefix = os.fspath(out_prefix)
    model = io.BytesIO()
    options = dict(
        sentence_iterator=texts,
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        # "\n" right after the turn markers, at 108 as in Gemma (sentences are lines, so
        # the trainer never sees a newline inside one).
        user_defined_symbols=[*_GEMMA_FILLERS, START_OF_TURN, END_OF_TURN, "\n"],
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=byte_fallback,
        character_coverage=1.0,
        hard_vocab_limit=True,
        minloglevel=2,
    )
    options.update(trainer_kwargs)
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training for {out_prefix} failed: {e}") from None
    path = out_prefix + ".model"
    GemmaTokenizer.from_proto(model.getvalue(), path)  # every special id where Gemma has it?
    write_atomically(path, model.getvalue())
    return path
