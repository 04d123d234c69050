"""Bundle an exported `.tflite` and its SentencePiece tokenizer into a `.litertlm` file.

A `.litertlm` file is what Google's LiteRT-LM engine (`litert_lm.Engine`, pip
`litert-lm-api`; also its Android, iOS and desktop runtimes) loads: one container holding the
model's `prefill_<T>` / `decode` `.tflite` as its PREFILL_DECODE section, the SentencePiece
model, and an `LlmMetadata` protobuf that tells the engine the start token, the stop tokens,
the cache length and the chat format. It is written with Google's `litert-lm-builder`.

What the engine expects from the `.tflite` (all true of `gemma_keras.tflite.export_tflite`):
signatures `prefill_<T>` and `decode`; inputs `tokens` int32 [1, T], `input_pos` int32 [T],
an additive float `mask` [1, 1, T, S] (the engine fills it: 0 where visible, -0.7 * FLT_MAX
elsewhere), and `kv_cache_k_<i>` / `kv_cache_v_<i>` passed in and returned; `decode` outputs
`logits` of rank 3, [1, 1, vocab]. The engine pads a short prefill with token 0 at position 0
and runs the last prompt token through `decode`.

This module imports neither TensorFlow nor Keras (only `litert_lm_builder` and the flatbuffer
schema that `ai-edge-litert` ships), so bundling a 2.6 GB file costs no model memory.

Example:
>>> from gemma_keras.tflite.litertlm import write_litertlm
>>> write_litertlm("gemma2_2b_int8.tflite", "tokenizer.model", "gemma2_2b_int8.litertlm",
...                max_num_tokens=1280)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
from pathlib import Path

import sentencepiece as spm

from gemma_keras.atomic_files import atomic_file
from gemma_keras.conventions import (
    BOS_ID,
    DECODE,
    END_OF_TURN,
    INPUT_POS,
    LOGITS,
    MASK,
    STOP_IDS,
    TOKENS,
    cache_names,
    prefill_lengths,
    prefill_name,
    turn_start,
)
from gemma_keras.tflite.flatbuffer import TFLiteFile

# Gemma's chat turns, as LiteRT-LM's prompt templates (used when a session or conversation
# applies the template) and as the Jinja template of its Conversation API.
GEMMA_PROMPT_TEMPLATES = {role: (turn_start(role), f"{END_OF_TURN}\n")
                          for role in ("user", "model")}
GEMMA_JINJA_TEMPLATE = (
    # The engine passes content as a string or as a list of {"type": "text", "text": ...}.
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{ bos_token }}"
    # Gemma has no system turn: a system message opens the first user turn.
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = text(messages[0]['content']) + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] in ('model', 'assistant') else 'user' -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if loop.first -%}{{ first_user_prefix }}{%- endif -%}"
    "{{ text(message['content']) + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


class LiteRTLMBundleError(ValueError):
    """The `.tflite` or tokenizer cannot make a `.litertlm` the LiteRT-LM engine runs."""


@dataclasses.dataclass(frozen=True)
class TFLiteLLMInfo:
    """What `inspect_tflite` reads from an exported file's signatures (no weights loaded)."""

    path: str
    prefill_lens: tuple
    cache_len: int
    num_layers: int
    vocab_size: int
    logits_shape: tuple


# ------------------------------------------------------------------ checking the .tflite
def inspect_tflite(tflite_path) -> TFLiteLLMInfo:
    """Read the signatures of an exported `.tflite` and check LiteRT-LM's conventions.

    Only the flatbuffer's tables are read (memory-mapped), never the weight buffers, so this
    is instant on a multi-GB file. Raises `LiteRTLMBundleError` naming what is missing.
    """
    path = Path(tflite_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .tflite file")
    try:
        with TFLiteFile(path) as file:
            signatures = file.signatures()
    except ValueError:
        raise LiteRTLMBundleError(f"{path}: not a TFLite flatbuffer (no TFL3 identifier)") \
            from None

    def fail(what):
        raise LiteRTLMBundleError(
            f"{path}: {what}. LiteRT-LM needs signatures prefill_<T> and decode with inputs "
            f"{TOKENS}, {INPUT_POS}, {MASK}, kv_cache_k_<i>/kv_cache_v_<i> and decode output "
            f"{LOGITS} [1, 1, vocab] (export it with gemma_keras.tflite.export_tflite); it has "
            f"signatures {sorted(signatures)}"
        )

    lens = prefill_lengths(signatures)
    if DECODE not in signatures:
        fail("no 'decode' signature")
    if not lens:
        fail("no 'prefill_<T>' signature")
    dec_in, dec_out = signatures[DECODE]
    for name in (TOKENS, INPUT_POS, MASK):
        if name not in dec_in:
            fail(f"decode has no input {name!r}")
    num_layers = 0
    while cache_names(num_layers + 1)[0][-1] in dec_in:
        num_layers += 1
    k_names, v_names = cache_names(num_layers)
    if not k_names:
        fail("decode has no kv_cache_k_<i> inputs")
    for k, v in zip(k_names, v_names):
        if v not in dec_in or k not in dec_out or v not in dec_out:
            fail(f"{k}/{v} must be both inputs and outputs of decode")
    if LOGITS not in dec_out:
        fail(f"decode has no output {LOGITS!r}")
    logits_shape = dec_out[LOGITS]
    if len(logits_shape) != 3 or logits_shape[:2] != (1, 1):
        fail(f"decode's {LOGITS} has shape {list(logits_shape)}; the engine reads rank-3 "
             f"[1, 1, vocab]")
    mask_shape = dec_in[MASK]
    cache_shape = dec_in[k_names[0]]  # [1, kv_heads, slots, head_dim]
    if len(cache_shape) != 4:
        fail(f"{k_names[0]} has shape {list(cache_shape)}; expected [1, kv_heads, slots, "
             f"head_dim]")
    cache_len = cache_shape[2]
    if len(mask_shape) != 4 or mask_shape[-1] != cache_len:
        fail(f"decode's {MASK} has shape {list(mask_shape)}; expected [1, 1, 1, {cache_len}]")
    for t in lens:
        p_in, _ = signatures[prefill_name(t)]
        for name in (TOKENS, INPUT_POS, MASK, *k_names):
            if name not in p_in:
                fail(f"{prefill_name(t)} has no input {name!r}")
    return TFLiteLLMInfo(str(path), tuple(lens), int(cache_len), len(k_names),
                         int(logits_shape[2]), tuple(logits_shape))


def _check_tokenizer(tokenizer_path, vocab_size, start_token_id, stop_token_ids):
    path = Path(tokenizer_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SentencePiece model")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise LiteRTLMBundleError(f"{path}: not a SentencePiece model ({e})") from None
    if sp.GetPieceSize() != vocab_size:
        raise LiteRTLMBundleError(
            f"{path}: the tokenizer has {sp.GetPieceSize()} pieces but the model's logits have "
            f"{vocab_size}; bundle the tokenizer the model was trained with")
    for what, ids in (("start token", [start_token_id]), ("stop tokens", stop_token_ids)):
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise LiteRTLMBundleError(f"{what} {bad} outside the vocabulary [0, {vocab_size})")


# ------------------------------------------------------------------ metadata
def llm_metadata(max_num_tokens, start_token_id=BOS_ID, stop_token_ids=STOP_IDS,
                 chat_template=True):
    """The `LlmMetadata` protobuf of a Gemma 2 bundle (model type `generic_model`).

    No sampler is stored: the engine's default applies unless a session passes its own
    `litert_lm.SamplerConfig` (greedy: `top_k=1`; the GREEDY sampler type of the metadata is
    not implemented by the engine).
    """
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    msg = llm_metadata_pb2.LlmMetadata()
    msg.start_token.token_ids.ids.append(int(start_token_id))
    for token in stop_token_ids:
        msg.stop_tokens.add().token_ids.ids.append(int(token))
    msg.max_num_tokens = int(max_num_tokens)
    msg.llm_model_type.generic_model.SetInParent()
    if chat_template:
        for role, (prefix, suffix) in GEMMA_PROMPT_TEMPLATES.items():
            affixes = getattr(msg.prompt_templates, role)
            affixes.prefix, affixes.suffix = prefix, suffix
        msg.jinja_prompt_template = GEMMA_JINJA_TEMPLATE
    return msg


# ------------------------------------------------------------------ writing
def write_litertlm(tflite_path, tokenizer_path, out_path, max_num_tokens=None, *,
                   start_token_id=BOS_ID, stop_token_ids=STOP_IDS,
                   chat_template=True, system_metadata=None):
    """Write `out_path` (.litertlm): the `.tflite`, the tokenizer and Gemma's `LlmMetadata`.

    Args:
      tflite_path: a file from `gemma_keras.tflite.export_tflite` (checked: signatures,
        inputs, rank-3 decode logits).
      tokenizer_path: the SentencePiece `tokenizer.model` (checked: its size matches the
        model's vocabulary).
      max_num_tokens: the engine's token budget (prompt plus generated); defaults to, and
        may not exceed, the file's KV-cache length.
      start_token_id / stop_token_ids: `<bos>` (2); `<eos>` (1) and `<end_of_turn>` (107).
      chat_template: store Gemma's chat turns (prompt templates and a Jinja template) so
        the engine's conversation API formats turns itself.
      system_metadata: extra `{key: str}` entries for the file header.
    Returns `out_path` as a `Path`. The file is written under a temporary name in the same
    directory and renamed when complete.
    """
    from litert_lm_builder import litertlm_builder as builder_lib

    info = inspect_tflite(tflite_path)
    if max_num_tokens is None:
        max_num_tokens = info.cache_len
    if not isinstance(max_num_tokens, int) or isinstance(max_num_tokens, bool) \
            or not 1 <= max_num_tokens <= info.cache_len:
        raise ValueError(f"max_num_tokens must be an integer in [1, {info.cache_len}] (the KV "
                         f"cache length of {info.path}), got {max_num_tokens!r}")
    stop_token_ids = [int(t) for t in stop_token_ids]
    _check_tokenizer(tokenizer_path, info.vocab_size, start_token_id, stop_token_ids)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = llm_metadata(max_num_tokens, start_token_id, stop_token_ids, chat_template)

    builder = builder_lib.LitertLmFileBuilder()
    entries = {"model": "gemma2", "exported_by": "gemma_keras",
               "kv_cache_max_len": str(info.cache_len),
               "prefill_lens": ",".join(map(str, info.prefill_lens)),
               **(system_metadata or {})}
    for key, value in entries.items():
        builder.add_system_metadata(
            builder_lib.Metadata(key=key, value=str(value), dtype=builder_lib.DType.STRING))
    builder.add_tflite_model(str(tflite_path), builder_lib.TfLiteModelType.PREFILL_DECODE)
    builder.add_sentencepiece_tokenizer(str(tokenizer_path))

    with atomic_file(out) as tmp, tempfile.TemporaryDirectory(
            prefix=".llm_metadata.", dir=out.parent) as work:
        meta_path = Path(work) / "llm_metadata.pb"
        meta_path.write_bytes(meta.SerializeToString())
        builder.add_llm_metadata(str(meta_path))
        with open(tmp, "wb") as f:
            builder.build(f)
    return out


def read_litertlm(litertlm_path):
    """`(LlmMetadata, [(section data type, {item: value}, size in bytes)])` of a `.litertlm`.

    Reads the header and the metadata section only (not the model), for checks and reports.
    """

    from litert_lm_builder import litertlm_core
    from litert_lm_builder import litertlm_header_schema_py_generated as schema
    from litert_lm_builder import litertlm_peek
    from litert_lm_builder.runtime.proto import llm_metadata_pb2

    path = Path(litertlm_path)
    try:
        header = litertlm_peek.read_litertlm_header(str(path), io.StringIO())
    except ValueError as e:
        raise LiteRTLMBundleError(f"{path}: not a .litertlm file ({e})") from None
    sections, meta = [], None
    objects = header.SectionMetadata()
    with open(path, "rb") as f:
        for i in range(objects.ObjectsLength() if objects else 0):
            obj = objects.Objects(i)
            items = {}
            for j in range(obj.ItemsLength()):
                kvp = litertlm_peek.kvp_to_dict(obj.Items(j))
                items[kvp["key"]] = kvp["value"]
            kind = litertlm_core.any_section_data_type_to_string(obj.DataType())
            sections.append((kind, items, obj.EndOffset() - obj.BeginOffset()))
            if obj.DataType() == schema.AnySectionDataType.LlmMetadataProto:
                f.seek(obj.BeginOffset())
                meta = llm_metadata_pb2.LlmMetadata()
                meta.ParseFromString(f.read(obj.EndOffset() - obj.BeginOffset()))
    if meta is None:
        raise LiteRTLMBundleError(f"{path}: no LlmMetadata section")
    return meta, sections
