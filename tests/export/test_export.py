"""Export round trips: every zoo family exports to one self-contained file
that ONNX Runtime runs like PyTorch at any batch size, with a manifest that
tells where it came from."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from export.errors import ExportError
from export.files import sha256_file
from export.onnx_export import export_from_factory, export_global_model, export_model
from export.signature import parse_input_spec, parse_input_specs
from fedge.onnxrt import OnnxPredictor
from fedge.torchkit import build_model

from .conftest import ZOO, sample_inputs, zoo_model


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_matches_pytorch_at_any_batch(exported_zoo, name):
    path = exported_zoo[name]
    manifest = json.loads(path.with_suffix(".manifest.json").read_text())
    assert manifest["verification"]["passed"] is True
    assert sorted(manifest["verification"]["batches"]) == [1, 3, 64]
    # One self-contained file (no external weights) at the default opset, batch dimension symbolic.
    assert sorted(p.name for p in path.parent.glob(f"{name}.*")) == [f"{name}.manifest.json", f"{name}.onnx"]
    proto = onnx.load(str(path))
    assert manifest["opset"] == 17 and manifest["ir_version"] == proto.ir_version
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    model = zoo_model(name)
    for batch in (1, 5, 17):
        x = sample_inputs(name, batch, seed=batch)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(OnnxPredictor(path).predict(x), expected, atol=1e-4, rtol=1e-3)


def test_manifest_records_file_signature_source_and_tools(exported_zoo, tmp_path):
    path = exported_zoo["cnn"]
    m = json.loads(path.with_suffix(".manifest.json").read_text())
    assert m["sha256"] == sha256_file(path)
    assert m["size_bytes"] == path.stat().st_size
    assert m["inputs"] == [{"name": "x", "shape": ["batch", 1, 28, 28], "dtype": "float32"}]
    assert m["outputs"] == [{"name": "output", "shape": ["batch", 10], "dtype": "float32"}]
    assert m["parameters"] == sum(p.numel() for p in build_model("tests.export.zoo:cnn").parameters())
    assert m["source"] == {"factory": "tests.export.zoo:cnn", "factory_args": {}}
    # Through the factory path the manifest says the same.
    again = export_from_factory("tests.export.zoo:cnn", [parse_input_spec("x:1x1x28x28")], tmp_path / "c.onnx",
                                factory_args={"classes": 4})
    assert again.manifest["source"] == {"factory": "tests.export.zoo:cnn", "factory_args": {"classes": 4}}
    assert again.manifest["outputs"][0]["shape"] == ["batch", 4]
    assert m["precision"] == "float32"
    assert {"torch", "onnx", "onnxruntime", "fedge"} <= set(m["tools"]) and m["tools"]["onnx"] == onnx.__version__
    assert m["created"].endswith("Z")
    assert all(row["ok"] and row["max_abs_diff"] <= 1e-4 for row in m["verification"]["outputs"])


def _trained_like(factory: str, **args) -> torch.nn.Module:
    torch.manual_seed(7)
    model = build_model(factory, args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _assert_runs_like(path, model, x):
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(OnnxPredictor(path).predict(x), expected, atol=1e-4, rtol=1e-3)


def test_weights_from_state_dict_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    model = _trained_like("tests.export.zoo:cnn")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    floats = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    save_file(floats, str(tmp_path / "w.safetensors"))
    x = sample_inputs("cnn", 4)
    for weights in ("w.pt", "w.safetensors"):
        out = tmp_path / f"{weights}.onnx"
        result = export_from_factory("tests.export.zoo:cnn", [parse_input_spec("x:1x1x28x28")], out,
                                     weights=tmp_path / weights)
        _assert_runs_like(out, model, x)
        src = result.manifest["source"]
        assert src["weights"]["sha256"] == sha256_file(tmp_path / weights)
        assert src["weights"]["format"] == ("safetensors" if weights.endswith("safetensors") else "state_dict")


def test_weights_from_a_fedge_global_model_message(tmp_path):
    from fedge.messages import GlobalModel
    from fedge.tensors import TensorSpec, pack
    from fedge.torchkit import federated_arrays

    model = _trained_like("tests.export.zoo:mlp", hidden=16)
    arrays = federated_arrays(model)
    message = GlobalModel(job="demo", round=12, model="tests.export.zoo:mlp", model_args={"hidden": 16},
                          spec=TensorSpec.of(arrays), body=pack(arrays)).encode()
    (tmp_path / "global.msg").write_bytes(message)
    x = sample_inputs("mlp", 6)
    # The message names its own factory and arguments: --model is optional.
    result = export_from_factory(None, [parse_input_spec("x:1x64")], tmp_path / "m.onnx",
                                 weights=tmp_path / "global.msg")
    _assert_runs_like(tmp_path / "m.onnx", model, x)
    src = result.manifest["source"]
    assert src["global_round"] == 12 and src["job"] == "demo"
    assert src["factory"] == "tests.export.zoo:mlp" and src["factory_args"] == {"hidden": 16}
    assert src["weights"]["sha256"] == sha256_file(tmp_path / "global.msg")
    # What the aggregator calls with the bytes it publishes.
    again = export_global_model(message, [parse_input_spec("x:1x64")], tmp_path / "agg.onnx")
    assert again.manifest["source"]["global_round"] == 12
    _assert_runs_like(tmp_path / "agg.onnx", model, x)


def test_several_inputs_and_outputs(tmp_path):
    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(4, 3)
            self.b = torch.nn.Linear(6, 3)

        def forward(self, image, meta):
            h = self.a(image) + self.b(meta)
            return h, h.softmax(-1)

    specs = parse_input_specs(["image:1x4", "meta:1x6:float32"])
    result = export_model(TwoHeads(), specs, tmp_path / "two.onnx", output_names=["logits", "probs"])
    assert [o["name"] for o in result.manifest["outputs"]] == ["logits", "probs"]
    assert {r.output for r in result.parity.rows} == {"logits", "probs"}
    outs = OnnxPredictor(tmp_path / "two.onnx").run({"image": np.ones((3, 4)), "meta": np.ones((3, 6))})
    assert [o.shape for o in outs] == [(3, 3), (3, 3)]


def test_transformer_at_opset_18_and_with_the_legacy_exporter(tmp_path):
    spec = [parse_input_spec("x:1x12x8")]
    r18 = export_from_factory("tests.export.zoo:transformer", spec, tmp_path / "t18.onnx", opset=18)
    assert r18.opset == 18 and r18.parity.ok
    legacy = export_from_factory("tests.export.zoo:mlp", [parse_input_spec("x:1x64")], tmp_path / "legacy.onnx",
                                 legacy_exporter=True)
    assert legacy.opset == 17 and legacy.parity.ok
    assert legacy.manifest["export"]["exporter"] == "torch.onnx.export(dynamo=False)"


def test_parity_failure_is_reported_and_leaves_no_file(tmp_path):
    from export.errors import QualityError

    class Noisy(torch.nn.Module):
        """Differs between PyTorch and ONNX: PyTorch adds noise at run time, the export bakes in one draw."""

        def forward(self, x):
            return x + torch.rand(1) * 10

    with pytest.raises(QualityError) as err:
        export_model(Noisy(), [parse_input_spec("x:1x4")], tmp_path / "noisy.onnx", legacy_exporter=True)
    assert "max abs diff" in str(err.value) and "batch" in err.value.report
    assert not (tmp_path / "noisy.onnx").exists() and not (tmp_path / "noisy.manifest.json").exists()


def test_unsupported_operator_names_the_operator_and_the_fix(tmp_path):
    with pytest.raises(ExportError) as err:
        export_from_factory("tests.export.zoo:custom_op_model", [parse_input_spec("x:1x8")], tmp_path / "c.onnx")
    message = str(err.value)
    assert "fedge_zoo.sensor_fusion" in message and "--legacy-exporter" in message and "\n" not in message


def test_a_model_that_pins_its_batch_size_is_refused(tmp_path):
    with pytest.raises(ExportError, match="pins the batch size"):
        export_from_factory("tests.export.zoo:fixed_batch_model", [parse_input_spec("x:1x16")], tmp_path / "f.onnx")


def test_input_spec_parsing():
    spec = parse_input_spec("tokens:1x32:int64")
    assert (spec.name, spec.shape, spec.dtype) == ("tokens", (1, 32), "int64")
    assert parse_input_spec("x:Nx3x8x8").shape == (1, 3, 8, 8)
    for bad in ("x", "x:1xq", "x:1x64:complex64", "x:0x4", ":1x4"):
        with pytest.raises(ExportError):
            parse_input_spec(bad)
    with pytest.raises(ExportError, match="unique"):
        parse_input_specs(["x:1x2", "x:1x3"])


def test_named_dynamic_dimensions_and_integer_ranges_from_the_embedding(tmp_path):
    """tokens:1xlen=12:int64 exports a model whose sequence length is dynamic;
    the parity check draws ids from the whole embedding table, found in the graph."""
    from export.onnx_export import integer_input_ranges

    spec = parse_input_spec("tokens:1xlen=12:int64")
    result = export_from_factory("tests.export.zoo:token_classifier", [spec], tmp_path / "tok.onnx",
                                 factory_args={"vocab": 50})
    assert result.manifest["inputs"] == [{"name": "tokens", "shape": ["batch", "len"], "dtype": "int64"}]
    assert result.manifest["export"]["dynamic_axes"] == {"tokens": {"0": "batch", "1": "len"}}
    assert integer_input_ranges(onnx.load(str(result.path))) == {"tokens": (0, 49)}
    assert result.parity.ok and not result.parity.notes
    predictor = OnnxPredictor(result.path)
    for length in (3, 40):
        assert predictor.predict(np.full((2, length), 49, np.int64)).shape == (2, 3)
    # A range given in the signature wins, and shows in the signature's JSON.
    assert parse_input_spec("tokens:1xlen=12:int64:0..9").to_json()["range"] == [0, 9]


def test_parity_says_when_integer_inputs_were_checked_on_0_and_1_only(tmp_path):
    class Offsets(torch.nn.Module):
        def forward(self, ids):
            return ids.float() * 0.5

    result = export_model(Offsets(), [parse_input_spec("ids:1x4:int64")], tmp_path / "o.onnx")
    assert result.parity.ok
    assert any("0 and 1 only" in n and "ids:...:int64:LOW..HIGH" in n for n in result.parity.notes)
    assert "note:" in result.parity.table()


def test_a_data_dependent_output_length_is_not_called_batch(tmp_path):
    result = export_from_factory("tests.export.zoo:positives", [parse_input_spec("x:1x6")], tmp_path / "p.onnx")
    first_dim = result.manifest["outputs"][0]["shape"][0]
    assert first_dim != "batch" and isinstance(first_dim, str)


def test_a_dimension_the_model_fixes_cannot_be_dynamic(tmp_path):
    with pytest.raises(ExportError, match="pins dimension 1"):
        export_from_factory("tests.export.zoo:mlp", [parse_input_spec("x:1xfeat=64")], tmp_path / "m.onnx")


def test_legacy_parity_failure_names_tracing_not_the_legacy_exporter(tmp_path):
    from export.errors import QualityError

    with pytest.raises(QualityError) as err:
        export_from_factory("tests.export.zoo:branch_on_values", [parse_input_spec("x:1x4")], tmp_path / "b.onnx",
                            legacy_exporter=True)
    message = str(err.value)
    assert "data-dependent control flow" in message and "try --legacy-exporter" not in message


@pytest.mark.parametrize("bad, names", [
    ("x:1xlen=1", ["len", "2 or more"]),
    ("x:batch=2x4", ["batch"]),
    ("x:1x4:int64:9..0", ["empty"]),
    ("x:1x4:float32:0..9", ["integer inputs only"]),
    ("x:1x4:int64:0-9", ["LOW..HIGH"]),
])
def test_input_spec_errors_name_the_fix(bad, names):
    with pytest.raises(ExportError) as err:
        parse_input_spec(bad)
    for name in names:
        assert name in str(err.value)
