"""The inference device's HTTP prediction API: answers, and a 400 with one
line saying why for a request it cannot answer, on a real socket with ONNX
Runtime."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from edge_agent.serve import PredictionServer, ServedModel
from fedge.onnxrt import OnnxPredictor


@pytest.fixture
def server(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3], w.ravel().tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "linear.onnx")
    served = ServedModel(OnnxPredictor(tmp_path / "linear.onnx", threads=1), {"round": 7})
    srv = PredictionServer("127.0.0.1:0", lambda: served)
    srv.start()
    yield srv
    srv.stop()


def post(srv: PredictionServer, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/predict", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_finite_inputs_are_answered(server):
    code, answer = post(server, b'{"inputs": [[1, 0, 0, 0], [0, 0, 0, 1]]}')
    assert code == 200 and answer["predictions"] == [2, 2] and answer["round"] == 7


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_nan_or_infinite_inputs_are_a_400_saying_so(server, value):
    # Python's json (and many clients) read and write these bare words.
    code, answer = post(server, f'{{"inputs": [[1, 0, 0, 0], [0, {value}, 0, 1]]}}'.encode())
    assert code == 400
    assert answer["error"].startswith("input 'x' holds 1 NaN or infinite value(s), the first in row 1")
    assert "\n" not in answer["error"]
