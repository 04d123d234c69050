"""`ChatSession`: a multi-turn chat in Gemma's turn format, with any runtime.

Keras-free: it only calls the runtime's `tokenizer` and `stream`, so `gemma-keras chat
--tflite` runs without TensorFlow or Keras.
"""

from __future__ import annotations

from gemma_keras import defaults
from gemma_keras.decoding import check_positive_int
from gemma_keras.tokenizer import tokenizer_of


class ChatSession:
    """A multi-turn chat in Gemma's turn format with anything that has `.tokenizer` and
    `.stream(prompt, max_new_tokens, sampler, seed=..., ...)`: a `Gemma2CausalLM` or a
    `gemma_keras.tflite.GemmaTFLite`.

    Each `send(text)` renders the whole history with the chat template and streams the
    reply (stopping at `<end_of_turn>`); the reply joins the history. The oldest turns are
    dropped when the history would not fit `limit` tokens (default: the `.tflite` file's
    cache, or the model's context) with `max_new_tokens` more. Turn n of a seeded session
    samples with `seed + n`.

    Example:
    >>> chat = ChatSession(lm, max_new_tokens=64)
    >>> print("".join(chat.send("reverse: cat dog")))
    """

    def __init__(self, model, max_new_tokens=None, limit=None, seed=None, **sampling):
        tokenizer_of(model, "chat")
        self.model = model
        if limit is None:
            limit = getattr(model, "cache_len", None) or model.config.max_position_embeddings
        self.limit = limit
        self.max_new_tokens = check_positive_int(
            "max_new_tokens", defaults.chat_reply_tokens(max_new_tokens, limit))
        self.seed = seed
        self.sampling = sampling
        self.messages = []

    def reset(self):
        self.messages = []

    def _prompt(self):
        tokenizer = self.model.tokenizer
        while True:
            prompt = tokenizer.apply_chat_template(self.messages)
            n = len(tokenizer.encode(prompt))
            if n + self.max_new_tokens <= self.limit or len(self.messages) == 1:
                return prompt
            self.messages = self.messages[2:]  # drop the oldest user/model pair

    def send(self, text):
        """Yield the reply to `text` in pieces; it is added to the history when complete."""
        if not text:
            raise ValueError("empty message")
        self.messages.append({"role": "user", "content": text})
        seed = None if self.seed is None else self.seed + len(self.messages)
        try:
            pieces = []
            for piece in self.model.stream(self._prompt(), max_new_tokens=self.max_new_tokens,
                                           seed=seed, **self.sampling):
                pieces.append(piece)
                yield piece
        except BaseException:
            self.messages.pop()  # a failed or interrupted turn leaves no trace
            raise
        self.messages.append({"role": "model", "content": "".join(pieces)})
