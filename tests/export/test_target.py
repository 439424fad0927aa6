"""What ``fedge quantize`` reports for a target holds on every host: the
host's CPU is read right, the exact copy of a model keeps every weight's
value, the report says how and where its figures were obtained, and on a CPU
whose int8 kernels saturate (an emulated AMD EPYC without VNNI) the figures
are still the target's."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from export.quantize import quantize_model
from export.target import _INT8_WEIGHTS, Evaluation, evaluation_for, exact_int8_copy, target_outputs
from fedge.cpu import parse_cpuinfo
from fedge.onnxrt import OnnxPredictor

from . import emulated_cpu
from .conftest import sample_inputs
from .emulated_cpu import CPU_WITHOUT_VNNI, emulator, run_emulated

XEON = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz\n"
        "flags\t\t: fpu sse sse2 sse4_1 avx avx2 f16c avx512f avx512bw avx512_vnni\n\nprocessor\t: 1\n")
EPYC_ROME = "processor\t: 0\nmodel name\t: AMD EPYC 7B12 64-Core Processor\nflags\t\t: fpu sse4_1 avx avx2 f16c\n"
PI4 = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
       "CPU architecture: 8\nCPU part\t: 0xd08\nCPU revision\t: 3\n\nHardware\t: BCM2835\n"
       "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n")
PI5 = ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
       "lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n")
ORIN = ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
        "lrcpc dcpop asimddp uscat ilrcpc flagm\nCPU implementer\t: 0x41\nCPU part\t: 0xd42\n")


@pytest.mark.parametrize("text, machine, board, model, int8_dot, saturates", [
    (XEON, "x86_64", "", "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "VNNI", False),
    (EPYC_ROME, "x86_64", "", "AMD EPYC 7B12 64-Core Processor", "AVX2 without VNNI", True),
    (PI4, "aarch64", "", "Cortex-A72 (Raspberry Pi 4 Model B Rev 1.4)", "NEON", False),
    (PI5, "aarch64", "", "Cortex-A76 (Raspberry Pi 5 Model B Rev 1.0)", "NEON dot product", False),
    (ORIN, "aarch64", "NVIDIA Jetson Orin Nano Developer Kit", "Cortex-A78AE (NVIDIA Jetson Orin Nano Developer Kit)",
     "NEON dot product", False),
])
def test_cpuinfo_names_the_cpu_and_its_int8_arithmetic(text, machine, board, model, int8_dot, saturates):
    cpu = parse_cpuinfo(text, machine, board)
    assert cpu.model == model
    assert cpu.int8_dot == int8_dot
    assert cpu.int8_saturation_expected is saturates
    assert cpu.describe().startswith(model) and machine in cpu.describe()


def _quantized_zoo(exported_zoo, tmp_path, cases):
    out = {}
    for name, mode, target in cases:
        calibration = {"x": sample_inputs(name, 64, seed=1)} if mode == "static" else None
        path = tmp_path / f"{name}.{target}.onnx"
        quantize_model(exported_zoo[name], path, mode=mode, calibration=calibration, target=target)
        out[name] = path
    return out


def _int8_weights(model):
    """(node, weight input, zero-point input) -> (weight values, zero-point values) of int8/uint8 weights."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        for w_idx, zp_idx, _ in _INT8_WEIGHTS.get(node.op_type, []):
            w = node.input[w_idx] if len(node.input) > w_idx else ""
            if w in inits and inits[w].dtype in (np.int8, np.uint8):
                zp_name = node.input[zp_idx] if len(node.input) > zp_idx else ""
                zp = inits.get(zp_name, np.zeros((), inits[w].dtype))
                if node.op_type == "DequantizeLinear" and zp.ndim == 1:  # per channel, along the node's axis
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % inits[w].ndim
                    zp = zp.reshape([-1 if i == axis else 1 for i in range(inits[w].ndim)])
                found[(node.name, w_idx)] = (inits[w], zp)
    return found


def test_exact_copy_keeps_every_weight_value_and_leaves_no_full_range_int8(exported_zoo, tmp_path):
    models = _quantized_zoo(exported_zoo, tmp_path, [("cnn", "static", "jetson"), ("mobilenet_block", "static",
                            "arm64"), ("lstm", "dynamic", "arm64"), ("transformer", "dynamic", "arm64")])
    for name, path in models.items():
        original = onnx.load(str(path))
        copy, stuck = exact_int8_copy(original)
        assert stuck == 0
        before, after = _int8_weights(original), _int8_weights(copy)
        assert before.keys() == after.keys() and before, name
        moved = 0
        for key, (w, zp) in before.items():
            w2, zp2 = after[key]
            # The value a kernel multiplies by is (weight - zero point): unchanged by the copy.
            np.testing.assert_array_equal(w.astype(np.int32) - zp.astype(np.int32),
                                          w2.astype(np.int32) - zp2.astype(np.int32))
            if w2.dtype == np.int8:
                assert w2.min() >= -64 and w2.max() <= 63, (name, key)
            moved += w2.dtype != w.dtype
        assert moved, f"{name}: nothing needed moving, so the test proves nothing"
        onnx.checker.check_model(copy)


def test_evaluation_says_whose_figures_and_whose_latency():
    pi, xeon, rome = (parse_cpuinfo(t, m) for t, m in ((PI5, "aarch64"), (XEON, "x86_64"), (EPYC_ROME, "x86_64")))
    on_pi = evaluation_for("arm64", "int8", full_range_weights=True, host=pi)
    assert on_pi.host_like_target and on_pi.target_faithful
    assert "a CPU of the target's kind" in on_pi.latency_label()
    on_xeon = evaluation_for("jetson", "int8", full_range_weights=True, host=xeon)
    assert not on_xeon.host_like_target and "not the target's (TensorRT on a Jetson)" in on_xeon.latency_label()
    assert evaluation_for("x86", "int8", full_range_weights=True, vnni=True, host=xeon).host_like_target
    assert not evaluation_for("x86", "int8", full_range_weights=False, vnni=False, host=xeon).host_like_target
    # A host whose default kernels saturate: figures from the exact copy, and the report says so.
    saturating = Evaluation("arm64", "int8", rome, host_int8_exact=False, exact_copy_works=True,
                            full_range_weights=True, host_like_target=False)
    assert saturating.host_default_differs and saturating.target_faithful
    assert saturating.method == "exact-int8-copy" and "exact copy" in saturating.summary()
    assert "AMD EPYC 7B12" in saturating.summary() and "AVX2 without VNNI" in saturating.summary()
    seven_bit = Evaluation("x86", "int8", rome, False, True, full_range_weights=False, host_like_target=True)
    assert not seven_bit.host_default_differs and "7-bit weights" in seven_bit.summary()
    broken = Evaluation("arm64", "int8", rome, False, False, True, False)
    assert not broken.target_faithful


def test_quantize_report_and_manifest_say_how_and_where(run_cli, digits_model, tmp_path):
    out, report = tmp_path / "d.int8.onnx", tmp_path / "r.json"
    r = run_cli("quantize", "--model", digits_model["onnx"], "--out", out, "--calibration", digits_model["calib"],
                "--eval", digits_model["eval"], "--target", "arm64", "--runs", "50", "--json", report)
    assert r.code == 0, r.err
    assert "figures from: " in r.out and "the host's latency, not the target's" in r.out
    doc = json.loads(report.read_text())
    ev = doc["evaluation"]
    assert ev["target"] == "arm64" and ev["target_faithful"] is True and ev["latency_is_target"] is False
    assert ev["host"]["machine"] == "x86_64" or ev["host"]["machine"] == "aarch64"
    assert ev["method"] in ("host-int8-kernels", "exact-int8-copy")
    assert doc["candidate"]["latency"]["measured_on"] and doc["candidate"]["latency"]["is_target_latency"] is False
    manifest = json.loads((tmp_path / "d.int8.manifest.json").read_text())
    assert manifest["evaluation"]["evaluation"]["method"] == ev["method"]
    assert manifest["evaluation"]["accuracy"] == doc["candidate"]["accuracy"]
    inspected = run_cli("inspect", out)
    assert f"method {ev['method']}" in inspected.out and "evaluated   accuracy" in inspected.out


def test_a_slower_or_larger_int8_file_is_said_plainly(exported_zoo, tmp_path):
    from export.report import Comparison, speed_words

    assert speed_words(1.0, 2.0) == "2.00x slower" and speed_words(3.0, 1.5) == "2.00x faster"
    result = quantize_model(exported_zoo["gru"], tmp_path / "gru.onnx", mode="dynamic")
    from export.report import compare_models

    cmp = compare_models(exported_zoo["gru"], result.path, latency=False)
    if cmp.size_ratio > 1:  # the GRU's weights stay float: int8 only adds scales
        assert "larger than the float file" in cmp.table()
        assert any("did not shrink" in n for n in cmp.notes)
    table = Comparison({"label": "f", "size_bytes": 10, "latency": {"p50_ms": 1.0, "p90_ms": 1.0, "batch": 1,
                        "threads": 2, "runs": 50}}, {"label": "q", "size_bytes": 5, "latency": {
                        "p50_ms": 2.0, "p90_ms": 3.0, "batch": 1, "threads": 2, "runs": 50}}, 0.5).table()
    assert "2.00x slower" in table and "faster" not in table


@pytest.mark.skipif(emulator() is None, reason="needs qemu-x86_64 (Debian's qemu-user; .ci/run installs it) on an "
                    "x86_64 host to emulate a CPU without VNNI")
def test_figures_are_the_targets_on_a_cpu_whose_int8_kernels_saturate(exported_zoo, tmp_path):
    """On an emulated AMD EPYC without VNNI (the CPU the issue was found on),
    the host's own kernels give other answers, and the target-faithful
    outputs are still exactly those computed on this machine."""
    models = _quantized_zoo(exported_zoo, tmp_path, [("gru", "dynamic", "arm64"), ("transformer", "dynamic",
                            "arm64"), ("lstm", "dynamic", "arm64"), ("mobilenet_block", "static", "arm64"),
                            ("cnn", "static", "jetson")])
    job = {"models": {}, "outputs": str(tmp_path / "emulated.npz"), "result": str(tmp_path / "emulated.json")}
    native = {}
    for name, path in models.items():
        x = sample_inputs(name, 64, seed=5)
        np.savez(tmp_path / f"{name}.x.npz", x=x)
        job["models"][name] = [str(path), str(tmp_path / f"{name}.x.npz")]
        native[name] = target_outputs(path, x)
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = run_emulated([emulated_cpu.__file__, str(tmp_path / "job.json")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "emulated.json").read_text())
    assert result == {"host_int8_exact": False, "exact_copy_exact": True}, f"{CPU_WITHOUT_VNNI} did not saturate"
    got = np.load(tmp_path / "emulated.npz")
    worst_default = 0.0
    for name in models:
        np.testing.assert_allclose(got[f"{name}.target"], native[name], atol=1e-5, err_msg=name)
        worst_default = max(worst_default, float(np.max(np.abs(got[f"{name}.default"] - native[name]))))
        reference = OnnxPredictor(exported_zoo[name]).predict(np.load(tmp_path / f"{name}.x.npz")["x"])
        assert np.max(np.abs(got[f"{name}.target"] - reference)) < 0.1 * max(1.0, float(np.max(np.abs(reference))))
    assert worst_default > 0.05, "the emulated CPU's own int8 kernels should have saturated somewhere"


@pytest.mark.skipif(emulator() is None, reason="needs qemu-x86_64 (Debian's qemu-user; .ci/run installs it) on an "
                    "x86_64 host to emulate a CPU without VNNI")
def test_accuracy_gate_on_a_cpu_whose_int8_kernels_saturate(exported_zoo, tmp_path):
    """The reported symptom: on an AMD EPYC without VNNI, `fedge quantize
    --target arm64 --max-accuracy-drop 1` failed good models. The gate now
    judges what the target computes, and the host's own figures are shown beside."""
    x = sample_inputs("gru", 400, seed=7)
    labels = OnnxPredictor(exported_zoo["gru"]).predict(x).argmax(1)  # the float model is right by definition
    np.savez(tmp_path / "eval.npz", x=x, labels=labels)
    argv = ["-m", "export.cli", "quantize", "--model", str(exported_zoo["gru"]), "--out", str(tmp_path / "g.onnx"),
            "--mode", "dynamic", "--target", "arm64", "--eval", str(tmp_path / "eval.npz"), "--max-accuracy-drop",
            "1", "--no-latency", "--json", str(tmp_path / "r.json")]
    proc = run_emulated(argv, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["evaluation"]["method"] == "exact-int8-copy" and doc["evaluation"]["target_faithful"]
    assert doc["evaluation"]["host_int8_products_exact"] is False
    assert doc["host_default_kernels"] is not None and "accuracy" in doc["host_default_kernels"]
    assert "exact copy" in proc.stdout and "default ONNX Runtime int8 kernels saturate" in proc.stdout
    # The same figures as this machine computes for the same file.
    native = target_outputs(tmp_path / "g.onnx", x).argmax(1)
    assert doc["candidate"]["accuracy"] == pytest.approx(float(np.mean(native == labels)))
