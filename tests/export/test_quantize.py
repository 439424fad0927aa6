"""Quantized variants of every zoo family load and run in ONNX Runtime and
stay close to the float model; target presets and fp16 do what they say."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from export.errors import ExportError
from export.quantize import quantize_model
from export.target import target_outputs
from fedge.onnxrt import OnnxPredictor

from .conftest import ZOO, sample_inputs


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(1) == b.argmax(1)))


@pytest.mark.parametrize("name", list(ZOO))
def test_each_family_quantizes_and_runs(exported_zoo, tmp_path, name):
    mode = ZOO[name][2]
    calibration = {"x": sample_inputs(name, 128, seed=1)} if mode == "static" else None
    out = tmp_path / f"{name}.int8.onnx"
    result = quantize_model(exported_zoo[name], out, mode=mode, calibration=calibration)
    x = sample_inputs(name, 64, seed=2)
    ref = OnnxPredictor(exported_zoo[name]).predict(x)
    # What the target computes (exact int8 products), whatever this host's own int8 kernels do.
    got = target_outputs(out, x)
    assert got.shape == ref.shape and np.all(np.isfinite(got))
    assert np.max(np.abs(got - ref)) < 0.1 * max(1.0, float(np.max(np.abs(ref))))
    m = result.manifest
    assert m["precision"] == "int8" and m["quantization"]["mode"] == mode
    assert m["parent"]["file"] == f"{name}.onnx" and m["source"]["factory"] == ZOO[name][0]
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    if mode == "static":
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert m["quantization"]["calibration"] is not None
    else:
        assert ops & {"DynamicQuantizeLinear", "DynamicQuantizeLSTM", "MatMulInteger"}


def test_target_presets_choose_types_and_range(exported_zoo, tmp_path):
    calibration = {"x": sample_inputs("cnn", 64)}
    expect = {
        ("arm64", None): ("int8", False),
        ("x86", False): ("uint8", True),
        ("x86", True): ("uint8", False),
        ("jetson", None): ("int8", False),
    }
    for (target, vnni), (activations, reduce_range) in expect.items():
        out = tmp_path / f"{target}-{vnni}.onnx"
        q = quantize_model(exported_zoo["cnn"], out, calibration=calibration, target=target, vnni=vnni)
        cfg = q.manifest["quantization"]
        assert (cfg["activation_type"], cfg["weight_type"], cfg["reduce_range"]) == (activations, "int8",
                                                                                       reduce_range)
        zero_points = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
                       if t.name.endswith("_zero_point")]
        if target == "jetson":
            # TensorRT needs symmetric quantization: every zero point is 0.
            assert zero_points and all(np.all(z == 0) for z in zero_points)


def test_jetson_preset_writes_tensorrt_options(exported_zoo, tmp_path):
    out = tmp_path / "cnn.jetson.onnx"
    result = quantize_model(exported_zoo["cnn"], out, calibration={"x": sample_inputs("cnn", 64)}, target="jetson")
    assert result.trt_options_path == tmp_path / "cnn.jetson.trt.json"
    doc = json.loads(result.trt_options_path.read_text())
    provider, options = doc["providers"][0]
    assert provider == "TensorrtExecutionProvider"
    assert options["trt_int8_enable"] is True and options["trt_fp16_enable"] is True
    assert options["trt_engine_cache_enable"] is True and options["trt_engine_cache_path"]
    assert options["trt_profile_min_shapes"] == "x:1x1x28x28"
    assert options["trt_profile_max_shapes"] == "x:64x1x28x28"
    assert "trt_int8_calibration_table_name" not in options
    assert doc["model_sha256"] == result.manifest["sha256"]
    with pytest.raises(ExportError, match="jetson"):
        quantize_model(exported_zoo["lstm"], tmp_path / "l.onnx", mode="dynamic", target="jetson")


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_calibration_methods_and_per_tensor(exported_zoo, tmp_path, method):
    x = sample_inputs("mobilenet_block", 64)
    out = tmp_path / f"{method}.onnx"
    q = quantize_model(exported_zoo["mobilenet_block"], out, calibration={"x": x}, method=method, per_channel=False)
    assert q.manifest["quantization"]["method"] == method and q.manifest["quantization"]["per_channel"] is False
    ref = OnnxPredictor(exported_zoo["mobilenet_block"]).predict(x)
    assert _agreement(target_outputs(out, x), ref) >= 0.9


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_fp16_runs_and_agrees_with_float32(exported_zoo, tmp_path, name):
    out = tmp_path / f"{name}.fp16.onnx"
    q = quantize_model(exported_zoo[name], out, mode="fp16")
    assert q.manifest["precision"] == "float16"
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    assert out.stat().st_size < 0.7 * exported_zoo[name].stat().st_size
    x = sample_inputs(name, 64, seed=3)
    ref = OnnxPredictor(exported_zoo[name]).predict(x)
    got = OnnxPredictor(out).predict(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=5e-3, rtol=1e-2)
    assert _agreement(got, ref) >= 0.95


def test_static_quantization_without_calibration_is_a_user_error(exported_zoo, tmp_path):
    with pytest.raises(ExportError, match="calibration"):
        quantize_model(exported_zoo["mlp"], tmp_path / "q.onnx", mode="static")


def test_a_weight_two_gemms_share_is_quantized_as_each_reads_it(tmp_path):
    """ONNX Runtime 1.23 (the newest on Python 3.10) transposed a transB
    weight in place once per Gemm: two Gemms sharing it got it back untransposed."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    gemm = {"transB": 1}
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["h"], **gemm), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Gemm", ["r", "w"], ["y"], **gemm)], "tied",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, str(tmp_path / "tied.onnx"))
    # 7-bit weights (the x86 preset without VNNI): no host's int8 kernels saturate them, so the error
    # measured is the shared weight's alone, on an AVX2 host without VNNI as on any other.
    quantize_model(tmp_path / "tied.onnx", tmp_path / "tied.int8.onnx", mode="dynamic", target="x86", vnni=False)
    x = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)
    expected = np.maximum(x @ w.T, 0) @ w.T
    got = OnnxPredictor(tmp_path / "tied.int8.onnx").predict(x)
    assert np.max(np.abs(got - expected)) < 0.05 * np.max(np.abs(expected))
