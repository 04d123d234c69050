"""TFLite export: conventions, builtin ops only, one embedding copy, sizes, exactness.

A random Gemma 2 (GQA, sliding window 5 shorter than the prompts, soft-caps on,
query_pre_attn_scalar != head_dim, every weight and norm randomised) is exported once in
all six quantizations (one trace). Its vocabulary is large enough that the weights, not the
graph, dominate the file, so the size check means something. Reference: the Keras model's
full forward pass and its `generate`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

from conftest import TINY_HF_CONFIG

VOCAB = 32768
CONFIG = {**TINY_HF_CONFIG, "model_type": "gemma2", "vocab_size": VOCAB, "hidden_size": 128,
          "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 24}
CACHE_LEN = 48
PREFILL_LENS = (4, 8)
QUANTIZATIONS = ("none", "fp16", "dynamic_int8", "int8_channel", "weight_only_int8",
                 "int4_block32", "int4_block128", "int4_channel")
# Logit error against Keras float32 as RMS error / std of the Keras logits, measured on this
# model (fp16 9e-4, dynamic int8 0.043, int8 per channel 0.030, weight-only int8 0.023,
# int4 block32 0.33, block128
# 0.37, per channel 0.38; random Gaussian weights are hard on int4) with about 1.5x margin.
# float32 is held to the design's 1e-4 absolute instead.
RELATIVE_RMS_BOUNDS = {"fp16": 2e-3, "dynamic_int8": 0.06, "int8_channel": 0.045,
                       "weight_only_int8": 0.035,
                       "int4_block32": 0.5, "int4_block128": 0.6, "int4_channel": 0.6}


def random_keras_lm(config, seed=0):
    """A float32 Gemma2CausalLM with every weight random (norms too, so `1 +` matters)."""
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.config import Gemma2Config

    lm = Gemma2CausalLM(Gemma2Config.from_hf_dict(config), dtype="float32")
    rng = np.random.default_rng(seed)
    for v in lm.variables:
        scale = 0.5 if "norm" in v.path else 0.1
        v.assign(rng.normal(0, scale, v.shape).astype("float32"))
    return lm


@pytest.fixture(scope="module")
def keras_lm():
    return random_keras_lm(CONFIG)


@pytest.fixture(scope="module")
def weights_before_export(keras_lm):
    return [v.numpy().copy() for v in keras_lm.variables]


@pytest.fixture(scope="module")
def exported(keras_lm, weights_before_export, tmp_path_factory):
    """{quantize: path} of the six exports."""
    from gemma_keras.tflite.export import export_tflite_variants

    out = tmp_path_factory.mktemp("tflite_export")
    return export_tflite_variants(keras_lm, {q: out / f"model_{q}.tflite" for q in QUANTIZATIONS},
                                  kv_cache_max_len=CACHE_LEN, prefill_lens=PREFILL_LENS,
                                  progress=False)


@pytest.fixture(scope="module")
def converter_exported(keras_lm, weights_before_export, tmp_path_factory):
    """{quantize: path} of the six exports by TensorFlow's converter with all the weights
    (`route="converter"`), the reference of the lean route."""
    from gemma_keras.tflite.export import export_tflite_variants

    out = tmp_path_factory.mktemp("tflite_export_converter")
    return export_tflite_variants(keras_lm, {q: out / f"model_{q}.tflite" for q in QUANTIZATIONS},
                                  kv_cache_max_len=CACHE_LEN, prefill_lens=PREFILL_LENS,
                                  progress=False, route="converter")


@pytest.mark.parametrize("quantize", QUANTIZATIONS)
def test_lean_export_equals_the_converters(exported, converter_exported, quantize):
    """The lean route (placeholders converted, weights streamed in) writes the converter
    route's file tensor by tensor: same signatures, operators (versions, options), tensor
    types, shapes, quantization and stored bytes."""
    from gemma_keras.tflite.file_compare import graph_differences

    assert graph_differences(converter_exported[quantize], exported[quantize]) == []


def test_file_compare_sees_a_different_encoding(converter_exported):
    """The comparison behind the equality test tells float32 from fp16 and int8 files."""
    from gemma_keras.tflite.file_compare import graph_differences

    assert graph_differences(converter_exported["none"], converter_exported["fp16"])
    assert graph_differences(converter_exported["dynamic_int8"],
                             converter_exported["weight_only_int8"])


def test_weight_map_names_each_stored_weight(exported, keras_lm):
    """The lean file records which checkpoint tensor each weight buffer holds: in float32,
    each such buffer holds that tensor's values (the table: divided by the final soft-cap)."""
    from gemma_keras.converters.weight_map import weight_specs
    from gemma_keras.tflite.weight_map_metadata import read_weight_map

    weight_map = read_weight_map(exported["none"])
    specs = {s.hf_name: s.variable.numpy() for s in weight_specs(keras_lm.backbone)}
    matrices = {name for name, v in specs.items() if v.ndim == 2}
    assert sorted(e["tensor"] for e in weight_map.values()) == sorted(matrices)
    data = memoryview(Path(exported["none"]).read_bytes())
    model = schema.Model.GetRootAsModel(data, 0)
    cap = CONFIG["final_logit_softcapping"]
    for buffer, entry in weight_map.items():
        expected = specs[entry["tensor"]]
        if entry["tensor"] == "model.embed_tokens.weight":
            assert entry["factor"] == np.float32(1 / cap)
            expected = expected * np.float32(1 / cap)
        b = model.Buffers(buffer)
        stored = np.frombuffer(data, np.float32, int(b.Size()) // 4, int(b.Offset()))
        np.testing.assert_array_equal(stored.reshape(expected.shape), expected)


def test_converter_route_records_the_weight_map(exported, converter_exported):
    """The converter route's dynamic_int8 file carries a weight map too: every int8 weight
    buffer named after its checkpoint tensor, with the lean file's factors."""
    from gemma_keras.tflite.weight_map_metadata import read_weight_map

    lean = read_weight_map(exported["dynamic_int8"])
    converter = read_weight_map(converter_exported["dynamic_int8"])
    assert sorted(e["tensor"] for e in converter.values()) == \
        sorted(e["tensor"] for e in lean.values())
    assert {e["tensor"]: e["factor"] for e in converter.values()} == \
        {e["tensor"]: e["factor"] for e in lean.values()}


def test_fp16_weights_are_the_float32_weights_rounded(exported):
    """The fp16 file holds each weight (found by the weight map) as the float32 file's
    values rounded to float16, read through a DEQUANTIZE in every signature."""
    from gemma_keras.tflite.flatbuffer import TFLiteFile
    from gemma_keras.tflite.weight_map_metadata import read_weight_map

    def by_tensor(path, dtype):
        with TFLiteFile(path) as file:
            return {e["tensor"]: np.frombuffer(file.buffer_bytes(b), dtype)
                    for b, e in read_weight_map(file).items()}

    float32 = by_tensor(exported["none"], np.float32)
    float16 = by_tensor(exported["fp16"], np.float16)
    assert sorted(float16) == sorted(float32)
    for name, values in float32.items():
        np.testing.assert_array_equal(float16[name], values.astype(np.float16))
    dequantized = _constant_operands(exported["fp16"], "DEQUANTIZE", 0)
    assert {b for _, _, b, _ in dequantized} >= set(read_weight_map(exported["fp16"]))


def test_lean_export_converts_one_float32_template(monkeypatch, tmp_path):
    """Every mode, fp16 included, is written from one float32 template: the converter runs
    once, without its float16 pass (which holds the 2B's float16 weights in full)."""
    from gemma_keras.tflite import export_graph
    from gemma_keras.tflite.export import export_tflite_variants

    calls, convert = [], export_graph.convert

    def recording(saved_model_dir, keys, quantize, placeholders=False):
        calls.append((quantize, placeholders))
        return convert(saved_model_dir, keys, quantize, placeholders)

    monkeypatch.setattr(export_graph, "convert", recording)
    lm = random_keras_lm(SMALL, seed=6)
    export_tflite_variants(lm, {q: tmp_path / f"{q}.tflite" for q in ("fp16", "dynamic_int8")},
                           kv_cache_max_len=16, prefill_lens=(4,), progress=False)
    assert calls == [("none", True)]


def test_float16_clamps_like_the_converter():
    """The converter clamps to +-65504 before rounding (ties to even): nothing becomes inf."""
    from gemma_keras.tflite.float16_constants import to_float16

    values = np.array([-1e30, 65520.0, 65519.0, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, np.nan],
                      np.float32)
    assert np.float16(np.float32(65520.0)) == np.inf  # what a plain cast would store
    got = to_float16(values)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got[:5], [-65504.0, 65504.0, 65504.0, 1.0,
                                            1.0 + 2 * 2.0**-10])
    assert np.isnan(got[5])


@pytest.mark.parametrize("quantize", ["none", "fp16", "dynamic_int8"])
def test_flatbuffer_reads_and_writes_back_the_same_bytes(exported, quantize, tmp_path):
    """`flatbuffer.TFLiteFile` unpacks a lean export and `rewrite_file` writes it back (the
    flatbuffer, then every buffer at its offset) byte for byte."""
    from gemma_keras.tflite import flatbuffer

    with flatbuffer.TFLiteFile(exported[quantize]) as file:
        out = flatbuffer.rewrite_file(file, file.unpack(), tmp_path / "copy.tflite")
    assert out.read_bytes() == Path(exported[quantize]).read_bytes()


@pytest.fixture(scope="module")
def prompt_and_reference(keras_lm):
    """A 20-token prompt and the Keras logits after each of its tokens [20, vocab]."""
    rng = np.random.default_rng(1)
    ids = [2] + rng.integers(3, VOCAB, 19).tolist()
    logits = keras_lm({"token_ids": np.array([ids]), "padding_mask": np.ones((1, len(ids)))})
    return ids, np.asarray(logits)[0]


def test_signatures_follow_litert_lm_conventions(exported):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(exported["none"]))
    signatures = interpreter.get_signature_list()
    assert sorted(signatures) == ["decode", "prefill_4", "prefill_8"]
    caches = [f"kv_cache_{kv}_{i}" for kv in "kv" for i in range(CONFIG["num_hidden_layers"])]
    heads, head_dim = CONFIG["num_key_value_heads"], CONFIG["head_dim"]
    cache_shapes = {"k": [1, heads, CACHE_LEN, head_dim], "v": [1, heads, head_dim, CACHE_LEN]}
    for name, seq_len in [("prefill_4", 4), ("prefill_8", 8), ("decode", 1)]:
        runner = interpreter.get_signature_runner(name)
        inputs = runner.get_input_details()
        assert sorted(inputs) == sorted(["tokens", "input_pos", "mask", *caches])
        assert list(inputs["tokens"]["shape"]) == [1, seq_len]
        assert inputs["tokens"]["dtype"] == np.int32
        assert list(inputs["input_pos"]["shape"]) == [seq_len]
        assert inputs["input_pos"]["dtype"] == np.int32
        assert list(inputs["mask"]["shape"]) == [1, 1, seq_len, CACHE_LEN]
        assert inputs["mask"]["dtype"] == np.float32
        for cache in caches:
            assert list(inputs[cache]["shape"]) == cache_shapes[cache.split("_")[2]]
        outputs = runner.get_output_details()
        expected = caches + (["logits"] if name == "decode" else [])
        assert sorted(outputs) == sorted(expected)
        for cache in caches:
            assert list(outputs[cache]["shape"]) == cache_shapes[cache.split("_")[2]]
    logits = interpreter.get_signature_runner("decode").get_output_details()["logits"]
    assert list(logits["shape"]) == [1, 1, VOCAB] and logits["dtype"] == np.float32


@pytest.mark.parametrize("quantize", QUANTIZATIONS)
def test_builtin_ops_only_no_variables(exported, quantize):
    from gemma_keras.tflite.file_info import RESOURCE_VARIABLE_OPS, TFLiteFileInfo

    info = TFLiteFileInfo(exported[quantize])
    ops = info.op_names()
    assert info.custom_ops() == [], f"custom/Flex ops in {quantize}: {info.custom_ops()}"
    assert not ops & RESOURCE_VARIABLE_OPS, f"resource variables in {quantize}: {ops}"
    assert "DYNAMIC_UPDATE_SLICE" in ops and "FULLY_CONNECTED" in ops


@pytest.mark.parametrize("quantize", QUANTIZATIONS)
def test_one_embedding_copy_and_size(exported, keras_lm, quantize):
    from gemma_keras.tflite.file_info import TFLiteFileInfo
    from gemma_keras.tflite.quantize import weight_bytes

    info = TFLiteFileInfo(exported[quantize])
    tables = info.buffers_of_shape((VOCAB, CONFIG["hidden_size"]))
    assert len(tables) == 1, f"{quantize}: the tied embedding is stored {len(tables)} times"
    expected = weight_bytes(keras_lm.config, quantize)
    # ai-edge-quantizer's per-channel int8 keeps a float32 scale and an int64 zero point per
    # row in each signature that reads the tensor: 36 bytes per embedding row here (3
    # signatures, 128-byte rows), about 1-2% of a 2B file (2304-byte rows). They are
    # reported, and the rest of the file must match the weights.
    params = info.quantization_param_bytes()
    print(f"{quantize}: file {info.size:,} bytes = weights at this precision {expected:,} "
          f"{info.size / expected - 1:+.1%}; of which per-channel quantization parameters "
          f"{params:,}")
    assert abs((info.size - params) / expected - 1) < 0.05


def _constant_operands(path, op_name, operand):
    """`[(signature, shape, buffer index, values)]` of input `operand` of every `op_name`
    operator in the file, where that input is a stored constant."""
    data = memoryview(Path(path).read_bytes())
    model = schema.Model.GetRootAsModel(data, 0)
    codes = [max(c.BuiltinCode(), c.DeprecatedBuiltinCode())
             for c in map(model.OperatorCodes, range(model.OperatorCodesLength()))]
    dtypes = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.FLOAT16: np.float16,
              schema.TensorType.INT8: np.int8}
    out = []
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for o in range(subgraph.OperatorsLength()):
            op = subgraph.Operators(o)
            if codes[op.OpcodeIndex()] != getattr(schema.BuiltinOperator, op_name):
                continue
            tensor = subgraph.Tensors(int(op.InputsAsNumpy()[operand]))
            buffer = model.Buffers(tensor.Buffer())
            if not (buffer.DataLength() or buffer.Size()):
                continue  # an activation
            dtype = dtypes.get(tensor.Type(), np.uint8)
            values = (buffer.DataAsNumpy().view(dtype) if buffer.DataLength() else
                      np.frombuffer(data, dtype, int(buffer.Size()) // np.dtype(dtype).itemsize,
                                    int(buffer.Offset())))
            shape = tuple(tensor.ShapeAsNumpy().tolist())
            out.append((subgraph.Name().decode(), shape, tensor.Buffer(), values.reshape(shape)))
    return out


def _kernels_out_in(lm):
    """`[(variable, values [out, in], stored transposed)]` of every projection kernel: Keras'
    Dense stores [in, out], gemma_keras' Linear [out, in]."""
    import keras

    out = []
    for layer in lm._flatten_layers():
        kernel = getattr(layer, "kernel", None)
        if kernel is not None and len(kernel.shape) == 2:
            dense = isinstance(layer, keras.layers.Dense)
            out.append((kernel, kernel.numpy().T if dense else kernel.numpy(), dense))
    return out


@pytest.mark.parametrize("quantize", ["none", "dynamic_int8"])
def test_weights_stored_out_in_once_with_no_transpose(exported, keras_lm, quantize):
    """Each projection kernel is one [out, in] constant (in the float32 file, exactly), which
    every signature's FULLY_CONNECTED reads; no TRANSPOSE reads a constant (the attention's
    TRANSPOSEs move activations)."""
    assert _constant_operands(exported[quantize], "TRANSPOSE", 0) == []
    weights = _constant_operands(exported[quantize], "FULLY_CONNECTED", 1)
    buffers = {}
    for _, shape, buffer, values in weights:
        assert buffers.setdefault(buffer, (shape, values))[0] == shape
    kernels = [w for _, w, _ in _kernels_out_in(keras_lm)]
    assert len(buffers) == len(kernels) + 1  # and the tied output head
    assert len({b for s, _, b, _ in weights if s == "decode"}) == len(buffers)
    stored_shapes = sorted(shape for shape, _ in buffers.values())
    expected_shapes = sorted([k.shape for k in kernels] + [(VOCAB, CONFIG["hidden_size"])])
    assert stored_shapes == expected_shapes
    if quantize == "none":
        for kernel in kernels:
            assert sum(np.array_equal(kernel, v) for _, v in buffers.values()) == 1


def test_keras_weights_bit_identical_after_export(exported, converter_exported, keras_lm,
                                                  weights_before_export):
    """The lean export only reads the Keras weights; the converter route releases them while
    the converter runs and restores them."""
    after = [v.numpy() for v in keras_lm.variables]
    assert len(after) == len(weights_before_export)
    for a, b in zip(after, weights_before_export):
        assert a.shape == b.shape and np.array_equal(a, b)


def _weight_matmuls(saved_model_dir):
    """`transpose_b` of every MatMul in the SavedModel that reads a weight: True everywhere
    means every weight is stored [out, in], so the converter has no TRANSPOSE to fold."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel.FromString((saved_model_dir / "saved_model.pb").read_bytes())
    flags = set()
    for function in saved.meta_graphs[0].graph_def.library.function:
        ops = {node.name: node.op for node in function.node_def}
        for node in function.node_def:
            if node.op == "MatMul" and ops.get(node.input[1].split(":")[0]) == "ReadVariableOp":
                flags.add(node.attr["transpose_b"].b)
    return flags


SMALL = {**CONFIG, "vocab_size": 512}


@pytest.mark.parametrize("failing", ["convert", "save"])
def test_failed_export_restores_keras_weights(tmp_path, monkeypatch, failing):
    """The converter route: an error in the converter (the weights are released by then, and
    read back from the SavedModel's checkpoint) or in the SavedModel write (before any
    release) leaves the Keras model as it was, and no files behind."""
    import tensorflow as tf

    import gemma_keras.tflite.export as export_lib
    from gemma_keras.tflite import export_graph

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    def convert(saved_model_dir, *args, **kwargs):
        assert _weight_matmuls(saved_model_dir) == {True}  # the converter's input
        boom()

    if failing == "convert":
        monkeypatch.setattr(export_graph, "convert", convert)
    else:
        monkeypatch.setattr(tf.saved_model, "save", boom)
    lm = random_keras_lm(SMALL, seed=3)
    before = [v.numpy().copy() for v in lm.variables]
    ids = np.array([[2, 5, 9, 11]])
    logits = np.asarray(lm({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    with pytest.raises(RuntimeError, match="boom"):
        export_lib.export_tflite_variants(lm, {"none": tmp_path / "x.tflite"},
                                          kv_cache_max_len=16, prefill_lens=(4,),
                                          progress=False, route="converter")
    for a, b in zip([v.numpy() for v in lm.variables], before):
        assert a.shape == b.shape and np.array_equal(a, b)
    again = np.asarray(lm({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    np.testing.assert_array_equal(again, logits)
    assert not list(tmp_path.iterdir()), "a failed export left files behind"


def test_export_refuses_lora_until_merged(tmp_path):
    from gemma_keras.tflite import export_tflite

    lm = random_keras_lm(SMALL, seed=4)
    lm.enable_lora(rank=2)
    before = [v.numpy().copy() for v in lm.variables]
    with pytest.raises(ValueError, match=r"LoRA adapters; merge them .*merge_lora\(\)"):
        export_tflite(lm, tmp_path / "x.tflite", kv_cache_max_len=16, prefill_lens=(4,))
    for a, b in zip([v.numpy() for v in lm.variables], before):
        assert np.array_equal(a, b)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("quantize", QUANTIZATIONS)
def test_decode_logits_match_keras(exported, prompt_and_reference, quantize):
    """Prefill the first 3 tokens, then decode one token at a time: the logits after each
    token are finite and match the Keras forward pass (fp32 within 1e-4 absolute, quantized
    within the measured relative bounds)."""
    from gemma_keras.tflite import GemmaTFLite

    ids, reference = prompt_and_reference
    runtime = GemmaTFLite(exported[quantize])
    logits = [runtime.start(ids[:3])] + [runtime.step(t) for t in ids[3:]]
    logits = np.stack(logits)
    assert np.isfinite(logits).all(), f"{quantize} produced non-finite logits"
    error = np.abs(logits - reference[2:])
    relative = np.sqrt(np.mean(error**2)) / reference[2:].std()
    agree = np.mean(logits.argmax(-1) == reference[2:].argmax(-1))
    print(f"{quantize}: max |logit error| {error.max():.2e}, RMS error / logit std "
          f"{relative:.2e}, top-1 agreement {agree:.2f}")
    if quantize == "none":
        assert error.max() < 1e-4
    else:
        assert relative < RELATIVE_RMS_BOUNDS[quantize]


def test_weight_only_int8_equals_keras_with_the_same_int8_weights(exported,
                                                                   prompt_and_reference):
    """Weight-only int8 dequantizes before each op, so it must match a Keras model whose
    matrices are rounded the same way (symmetric, one scale per output row) within 1e-4:
    nothing dropped, nothing folded twice."""
    from gemma_keras.tflite import GemmaTFLite

    lm = random_keras_lm(CONFIG)
    embedding = lm.backbone.embed_tokens.embeddings
    for v, w, transposed in _kernels_out_in(lm) + [(embedding, embedding.numpy(), False)]:
        scale = np.abs(w).max(axis=1, keepdims=True) / 127  # one scale per output row
        rounded = (np.round(w / scale) * scale).astype("float32")
        v.assign(rounded.T if transposed else rounded)
    ids = prompt_and_reference[0]
    reference = np.asarray(lm({"token_ids": np.array([ids]),
                               "padding_mask": np.ones((1, len(ids)))}))[0]
    runtime = GemmaTFLite(exported["weight_only_int8"])
    logits = np.stack([runtime.start(ids[:3])] + [runtime.step(t) for t in ids[3:]])
    np.testing.assert_allclose(logits, reference[2:], atol=1e-4, rtol=0)


def test_chunked_prefill_matches_keras(exported, prompt_and_reference):
    """A 20-token prompt is prefilled in chunks (8, 8, then 4 holding the last 3 with one pad
    token) before decode; the logits after it match Keras."""
    from gemma_keras.tflite import GemmaTFLite

    ids, reference = prompt_and_reference
    runtime = GemmaTFLite(exported["none"])
    assert runtime._prefill_plan(0, len(ids) - 1) == [(8, 8), (8, 8), (4, 3)]
    np.testing.assert_allclose(runtime.start(ids), reference[-1], atol=1e-4, rtol=0)


def test_greedy_32_tokens_identical_to_keras(exported, keras_lm, prompt_and_reference):
    from gemma_keras.tflite import GemmaTFLite

    ids = prompt_and_reference[0][:12]
    expected = keras_lm.generate([ids], max_new_tokens=32, stop_token_ids=())[0]
    got = GemmaTFLite(exported["none"]).generate(ids, max_new_tokens=32, stop_token_ids=())
    assert len(expected) == 32
    assert got == expected


def test_export_rejects_bad_arguments(keras_lm, tmp_path):
    from gemma_keras.tflite import export_tflite

    with pytest.raises(ValueError, match="quantize must be one of"):
        export_tflite(keras_lm, tmp_path / "x.tflite", quantize="int3")
    with pytest.raises(ValueError, match="longer than the cache"):
        export_tflite(keras_lm, tmp_path / "x.tflite", kv_cache_max_len=16, prefill_lens=(32,))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        export_tflite(keras_lm, tmp_path / "x.tflite", kv_cache_max_len=4096)
    small = random_keras_lm({**CONFIG, "hidden_size": 48, "intermediate_size": 80})
    with pytest.raises(ValueError,
                       match="not multiples of 32: hidden_size = 48, intermediate_size = 80"):
        export_tflite(small, tmp_path / "x.tflite", quantize="int4_block32",
                      kv_cache_max_len=16, prefill_lens=(4,))
    assert not list(tmp_path.iterdir()), "a refused export left files behind"


def test_export_refuses_a_bfloat16_model(tmp_path):
    from gemma_keras.causal_lm import Gemma2CausalLM
    from gemma_keras.config import Gemma2Config
    from gemma_keras.tflite import export_tflite

    lm = Gemma2CausalLM(Gemma2Config.from_hf_dict(CONFIG), dtype="bfloat16")
    with pytest.raises(ValueError, match="computes in bfloat16 .* dtype='float32'"):
        export_tflite(lm, tmp_path / "x.tflite", kv_cache_max_len=16, prefill_lens=(4,))


@pytest.mark.parametrize("kind", ["hf", "keras"])
def test_lean_export_from_a_model_directory(tmp_path, kind):
    """From a Hugging Face (safetensors) or gemma-keras (.weights.h5) directory, read tensor
    by tensor, the lean export writes the file it writes from the model in memory."""
    from gemma_keras.converters.hf_export import write_hf_dir
    from gemma_keras.converters.keras_dir import write_model_dir
    from gemma_keras.tflite.export import export_tflite
    from gemma_keras.tflite.file_compare import graph_differences

    lm = random_keras_lm(SMALL, seed=5)
    directory = tmp_path / kind
    directory.mkdir()
    if kind == "hf":
        write_hf_dir(lm, directory, "float32")
    else:
        write_model_dir(lm, directory)
    options = dict(quantize="dynamic_int8", kv_cache_max_len=16, prefill_lens=(4,),
                   progress=False)
    from_model = export_tflite(lm, tmp_path / "model.tflite", **options)
    from_dir = export_tflite(directory, tmp_path / "dir.tflite", **options)
    assert graph_differences(from_model, from_dir) == []
