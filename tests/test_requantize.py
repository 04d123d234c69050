"""Streaming requantization of a dynamic-int8 export to int4 (`tflite/requantize.py`).

A random Gemma 2 is exported once as dynamic int8 and as float32; ai-edge-quantizer turns the
float32 file into int4 block 32, block 128 and per channel, and int8 per channel, the reference. The requantized int8
file must equal ai-edge-quantizer's file wherever the weights are concerned (values, scales, tensor types and quantization
parameters, op codes, versions and options), decode the same logits, keep the tied embedding
one tensor, find each weight by the file's weight map, and refuse bad inputs with a clear
error and no file left behind.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_HF_CONFIG
from test_tflite_export import random_keras_lm

VOCAB, HIDDEN = 2048, 128
CONFIG = {**TINY_HF_CONFIG, "model_type": "gemma2", "vocab_size": VOCAB, "hidden_size": HIDDEN,
          "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 24}
MODES = ("int4_block32", "int4_block128", "int4_channel", "int8_channel")


@pytest.fixture(scope="module")
def keras_lm():
    return random_keras_lm(CONFIG)


@pytest.fixture(scope="module")
def exported(keras_lm, tmp_path_factory):
    """The dynamic_int8 export, and each of MODES as ai-edge-quantizer writes it from the
    float32 export (with the table GATHERs made EMBEDDING_LOOKUPs first, as it needs)."""
    from gemma_keras.tflite.export import export_tflite_variants
    from gemma_keras.tflite.quantize import gathers_to_embedding_lookups, quantize_flatbuffer

    out = tmp_path_factory.mktemp("requantize_export")
    files = export_tflite_variants(keras_lm, {q: out / f"{q}.tflite"
                                              for q in ("dynamic_int8", "none")},
                                   kv_cache_max_len=32, prefill_lens=(4,), progress=False)
    lookups = gathers_to_embedding_lookups(files["none"].read_bytes())
    for q in MODES:
        files[q] = out / f"{q}.tflite"
        files[q].write_bytes(quantize_flatbuffer(lookups, q))
    return files


@pytest.fixture(scope="module")
def requantized(keras_lm, exported, tmp_path_factory):
    from gemma_keras.tflite.requantize import keras_weights, requantize_tflite

    out = tmp_path_factory.mktemp("requantized")
    weights = keras_weights(keras_lm)
    return {q: requantize_tflite(exported["dynamic_int8"], weights, q, out / f"{q}.tflite")
            for q in MODES}


def _load(path):
    from ai_edge_litert import schema_py_generated as schema

    data = path.read_bytes()
    return data, schema.ModelT.InitFromPackedBuf(data, 0)


def _bytes(data, model, index):
    buffer = model.buffers[index]
    if buffer.data is not None:
        return np.asarray(buffer.data, np.uint8).tobytes()
    return data[buffer.offset:buffer.offset + buffer.size]


def _op_codes(model):
    return [(max(c.builtinCode, c.deprecatedBuiltinCode), c.version)
            for c in model.operatorCodes]


def _fields(obj, drop=()):
    return {k: (np.asarray(v).tolist() if isinstance(v, (list, np.ndarray)) else v)
            for k, v in vars(obj).items() if k not in drop}


@pytest.mark.parametrize("quantize", MODES)
def test_same_encoding_as_ai_edge_quantizer(exported, requantized, quantize):
    """Op by op, every int4 weight (and its scales tensor) equals ai-edge-quantizer's in
    bytes, type, shape and quantization parameters; op codes, versions and options match."""
    assert_same_weights_as(requantized[quantize], exported[quantize], quantize)


@pytest.mark.parametrize("quantize", MODES)
def test_a_float32_export_needs_no_weights(exported, quantize, tmp_path):
    """A float32 export holds its own weights: requantized with no `weights` at all, it
    equals ai-edge-quantizer's file from that same export."""
    from gemma_keras.tflite.requantize import requantize_tflite

    out = requantize_tflite(exported["none"], {}, quantize, tmp_path / "from_float.tflite")
    assert_same_weights_as(out, exported[quantize], quantize)


def assert_same_weights_as(ours_path, ref_path, quantize):
    from ai_edge_litert import schema_py_generated as schema

    ours_data, ours = _load(ours_path)
    ref_data, ref = _load(ref_path)
    assert _op_codes(ours) == _op_codes(ref)
    compared = 0
    for ours_sg, ref_sg in zip(ours.subgraphs, ref.subgraphs, strict=True):
        assert ([ours.operatorCodes[o.opcodeIndex].builtinCode for o in ours_sg.operators]
                == [ref.operatorCodes[o.opcodeIndex].builtinCode for o in ref_sg.operators])
        for ours_op, ref_op in zip(ours_sg.operators, ref_sg.operators):
            assert ours_op.builtinOptionsType == ref_op.builtinOptionsType
            if ref_op.builtinOptions is not None:
                assert _fields(ours_op.builtinOptions) == _fields(ref_op.builtinOptions)
            for i, j in zip(ours_op.inputs, ref_op.inputs, strict=True):
                if j < 0 or ref_sg.tensors[j].type not in (schema.TensorType.INT4,
                                                            schema.TensorType.INT8):
                    continue
                a, b = ours_sg.tensors[i], ref_sg.tensors[j]
                assert _fields(a, ("name", "buffer", "quantization")) == \
                    _fields(b, ("name", "buffer", "quantization"))
                assert _fields(a.quantization, ("details",)) == \
                    _fields(b.quantization, ("details",))
                assert _bytes(ours_data, ours, a.buffer) == _bytes(ref_data, ref, b.buffer)
                compared += 1
                if quantize.endswith("_channel"):  # the scales: the parameters compared above
                    assert b.quantization.details is None and len(b.quantization.scale) == \
                        b.shape[0]
                    continue
                assert _fields(a.quantization.details, ("scales",)) == \
                    _fields(b.quantization.details, ("scales",))
                sa = ours_sg.tensors[a.quantization.details.scales]
                sb = ref_sg.tensors[b.quantization.details.scales]
                assert sa.name == a.name + b"_scales" and sb.name == b.name + b"_scales"
                assert _fields(sa, ("name", "buffer")) == _fields(sb, ("name", "buffer"))
                assert _bytes(ours_data, ours, sa.buffer) == _bytes(ref_data, ref, sb.buffer)
    weight_ops = (schema.BuiltinOperator.FULLY_CONNECTED, schema.BuiltinOperator.EMBEDDING_LOOKUP)
    assert compared == sum(ref.operatorCodes[op.opcodeIndex].builtinCode in weight_ops
                           for subgraph in ref.subgraphs for op in subgraph.operators)


@pytest.mark.parametrize("quantize", MODES)
def test_decode_logits_equal_ai_edge_quantizer(exported, requantized, quantize):
    from gemma_keras.tflite import GemmaTFLite

    ids = [2] + np.random.default_rng(0).integers(3, VOCAB, 9).tolist()
    logits = {}
    for name, path in [("ours", requantized[quantize]),
                       ("ai-edge-quantizer", exported[quantize])]:
        runtime = GemmaTFLite(path)
        logits[name] = np.stack([runtime.start(ids[:3])] + [runtime.step(t) for t in ids[3:]])
    assert np.isfinite(logits["ours"]).all()
    np.testing.assert_allclose(logits["ours"], logits["ai-edge-quantizer"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("quantize", MODES)
def test_tied_embedding_stays_one_tensor(exported, requantized, quantize):
    from gemma_keras.tflite.file_info import TFLiteFileInfo

    info = TFLiteFileInfo(requantized[quantize])
    assert len(info.buffers_of_shape((VOCAB, HIDDEN))) == 1
    ops = info.op_names()
    assert "EMBEDDING_LOOKUP" in ops and not ops & {"GATHER", "DEQUANTIZE"}
    assert info.custom_ops() == []
    # Same weights as ai-edge-quantizer's file; the rest (the converter's graph) barely differs.
    reference = TFLiteFileInfo(exported[quantize])
    assert info.stored_bytes() == pytest.approx(reference.stored_bytes(), rel=0.01)
    assert info.signature_names() == reference.signature_names()


def _arrays(keras_lm):
    """`{checkpoint tensor name: loader}` of the model's weights, as a plain dict."""
    from gemma_keras.converters.weight_map import weight_specs

    return {s.hf_name: s.variable.numpy for s in weight_specs(keras_lm.backbone)}


def test_weights_are_found_by_the_files_weight_map(keras_lm, exported, requantized, tmp_path):
    """A plain dict of arrays named as the file's weight map names them gives the file that
    the model's own weights give; extra entries are never loaded."""
    from gemma_keras.tflite.requantize import requantize_tflite

    def never():
        raise AssertionError("a tensor the file does not hold was loaded")

    weights = {**_arrays(keras_lm), "unused": never}
    out = requantize_tflite(exported["dynamic_int8"], weights, "int4_block32", tmp_path / "t")
    assert out.read_bytes() == requantized["int4_block32"].read_bytes()


def _refused(tmp_path, source, weights, match, quantize="int4_block32"):
    from gemma_keras.tflite.requantize import requantize_tflite

    out = tmp_path / "out" / "model.tflite"
    out.parent.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match=match):
        requantize_tflite(source, weights, quantize, out)
    assert not list(out.parent.iterdir()), "a refused requantization left files behind"


def _without_weight_map(path, out):
    """A copy of `path` with its weight map metadata dropped (as older exports wrote it)."""
    from gemma_keras.conventions import WEIGHT_MAP_METADATA
    from gemma_keras.tflite import flatbuffer

    with flatbuffer.TFLiteFile(path) as file:
        model = file.unpack()
        model.metadata = [m for m in model.metadata if m.name != WEIGHT_MAP_METADATA.encode()]
        return flatbuffer.rewrite_file(file, model, out)


def test_bad_inputs_are_refused_and_leave_no_file(keras_lm, exported, tmp_path):
    int8 = exported["dynamic_int8"]
    good = _arrays(keras_lm)
    q_proj = "model.layers.1.self_attn.q_proj.weight"
    missing = {k: v for k, v in good.items() if k != q_proj}
    # (the lean export names each weight tensor after its checkpoint tensor)
    _refused(tmp_path, int8, missing, rf"tensor '{q_proj}' holds checkpoint tensor "
             rf"'{q_proj}' by the file's weight map, which `weights` does not have")
    wrong_shape = {**good, q_proj: np.zeros((HIDDEN, 96), np.float32)}
    _refused(tmp_path, int8, wrong_shape, rf"tensor {q_proj} has shape \[128, 96\]; tensor "
             rf"'{q_proj}' of the file is \[128, 128\]")
    embedding = "model.embed_tokens.weight"
    capped_twice = {**good, embedding: lambda: good[embedding]() / CONFIG[
        "final_logit_softcapping"]}
    _refused(tmp_path, int8, capped_twice, rf"checkpoint tensor '{embedding}' does not hold "
             rf"the values of tensor '{embedding}' at row \d+")

    def broken():
        raise OSError("disk on fire")

    _refused(tmp_path, int8, {**good, q_proj: broken}, rf"weights\['{q_proj}'\] could not be "
             r"loaded: disk on fire")
    _refused(tmp_path, int8, good, "quantize must be one of", quantize="int4_block64")

    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(int8.read_bytes()[: int8.stat().st_size // 2])
    _refused(tmp_path, truncated, good, "truncated.tflite is truncated: buffer")
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"not a model at all")
    _refused(tmp_path, garbage, good, "garbage.tflite is not a .tflite flatbuffer")
    float_file = exported["int4_block32"]
    _refused(tmp_path, float_file, good, "expected an int8 .*weight")
    no_map = _without_weight_map(int8, tmp_path / "no_map.tflite")
    _refused(tmp_path, no_map, good, r"no_map.tflite records no weight map .* re-export it")


def test_a_value_that_does_not_round_to_the_file_fails_while_writing(keras_lm, exported,
                                                                    tmp_path):
    """One value off by many int8 steps: the write checks every value against the int8 data
    it replaces, fails naming the row, and removes its partial file."""
    weights = _arrays(keras_lm)
    name = "model.layers.0.mlp.up_proj.weight"  # [out, in] = [256, 128]
    kernel = weights[name]().copy()
    kernel[5, 77] += 1.0
    _refused(tmp_path, exported["dynamic_int8"], {**weights, name: kernel},
             rf"checkpoint tensor '{name}' does not hold the values of tensor '{name}' at "
             rf"row 5:")


def test_checkpoint_weights_read_the_exporters_checkpoint(keras_lm, exported, requantized,
                                                          tmp_path):
    """`checkpoint_weights` reads `weights/<i>` (the i-th Keras variable), the layout of the
    exporter's SavedModel checkpoint."""
    import tensorflow as tf

    from gemma_keras.tflite.requantize import checkpoint_weights, requantize_tflite

    values = [v.numpy() for v in keras_lm.variables]
    path = tf.train.Checkpoint(weights=[tf.Variable(v) for v in values]).write(
        str(tmp_path / "ckpt" / "variables"))
    out = requantize_tflite(exported["dynamic_int8"], checkpoint_weights(path, keras_lm),
                            "int4_block32", tmp_path / "from_checkpoint.tflite")
    assert out.read_bytes() == requantized["int4_block32"].read_bytes()


def test_per_channel_scales_are_stored_once(exported, requantized):
    """Each weight's per-channel scales are one table in the file that every signature's
    tensor points at (ai-edge-quantizer repeats them per signature): same scales everywhere,
    one position, and a smaller file."""
    from ai_edge_litert import schema_py_generated as schema

    data = requantized["int4_channel"].read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    tables = {}  # weight buffer -> positions of its tensors' quantization tables
    uses = 0
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for t in range(subgraph.TensorsLength()):
            tensor = subgraph.Tensors(t)
            if tensor.Type() == schema.TensorType.INT4:
                q = tensor.Quantization()
                assert q.ScaleLength() == tensor.Shape(0) and not q.ZeroPointAsNumpy().any()
                tables.setdefault(tensor.Buffer(), set()).add(q._tab.Pos)
                uses += 1
    assert len(tables) > 1 and uses > len(tables), "expected weights read by several signatures"
    assert all(len(positions) == 1 for positions in tables.values())
    assert len(data) < exported["int4_channel"].stat().st_size


