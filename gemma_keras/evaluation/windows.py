"""Documents to the token windows a model scores.

A document is `<bos>` + its tokens; every token after `<bos>` is predicted from the tokens
before it in its window. A document longer than the context is cut into windows of
`context` tokens that start every `stride` tokens, as in Hugging Face's guide to the
perplexity of fixed-length models: each window scores only the tokens that no earlier window
scored, so every token is predicted once, from up to `context - 1` tokens before it
(`stride == context`: disjoint windows, each predicting all its tokens but its first).
"""

from __future__ import annotations

import dataclasses

from gemma_keras.evaluation.data import DataError


@dataclasses.dataclass(frozen=True)
class Window:
    """The tokens of one model run; the last `scored` of them are predicted."""

    token_ids: tuple
    scored: int
    document: int  # index of the document it comes from


def document_ids(tokenizer, text) -> list[int]:
    """`<bos>` + the tokens of `text`."""
    return tokenizer.encode(text, add_bos=True)


def split(ids, context, stride, document=0) -> list[Window]:
    """The windows of one document's token ids (see the module docstring)."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    n, out, previous_end = len(ids), [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        scored = min(end - previous_end, end - begin - 1)
        if scored > 0:
            out.append(Window(tuple(ids[begin:end]), scored, document))
        previous_end = end
        if end == n:
            break
    return out


def document_windows(tokenizer, documents, context, stride=None) -> list[Window]:
    """The windows of every `Document`; without `stride`, a document longer than `context`
    tokens is refused (DataError naming its file and line)."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    windows = []
    for index, document in enumerate(documents):
        ids = document_ids(tokenizer, document.text)
        if len(ids) < 2:
            raise DataError(f"{document.source}: the text encodes to no token")
        if stride is None and len(ids) > context:
            raise DataError(
                f"{document.source}: the document has {len(ids)} tokens (<bos> included), "
                f"more than the context of {context}; pass --stride N (stride= in Python) to "
                f"score it in windows of {context} tokens, or a larger --context")
        windows += split(ids, context, stride or context, index)
    return windows
