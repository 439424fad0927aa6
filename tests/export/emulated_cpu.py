"""Run ONNX Runtime on this machine as if it were another x86 CPU.

``qemu-x86_64 -cpu EPYC-Rome`` runs an x86-64 program under user-mode
emulation that answers CPUID as an AMD EPYC 7002 does: AVX2, no AVX-512, no
VNNI, the CPU on which ONNX Runtime's u8 x s8 kernels saturate. ONNX Runtime
dispatches its kernels on CPUID, so its int8 arithmetic there is that CPU's
(PyTorch's float kernels are not trustworthy under this emulator, so only
ONNX Runtime code runs in it).

Run as a script under the emulator, this file evaluates quantized models the
way ``fedge quantize`` does and writes what it computed:

    qemu-x86_64 -cpu EPYC-Rome python tests/export/emulated_cpu.py job.json

``python tests/export/emulated_cpu.py suite`` (``make test-no-vnni``) runs
the whole export test suite under the emulator, PyTorch included, with
PyTorch's oneDNN kernels off: their JIT code computes wrong results under
qemu's TCG (an LSTM's outputs differ by 0.17), the rest of PyTorch does not.
Subprocesses the tests start run on the real CPU.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CPU_WITHOUT_VNNI = "EPYC-Rome"


def emulator() -> str | None:
    """The emulator's path when it can run this machine's Python, else None."""
    if platform.machine() != "x86_64":
        return None
    return shutil.which("qemu-x86_64")


def run_emulated(argv: list[str], cpu: str = CPU_WITHOUT_VNNI, timeout: float = 600,
                 cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    qemu = emulator()
    assert qemu, "qemu-x86_64 is not installed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([qemu, "-cpu", cpu, sys.executable, *argv], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)


def _main(job_path: str) -> None:
    import numpy as np

    from export.target import int8_products_exact, target_outputs
    from fedge.onnxrt import OnnxPredictor

    job = json.loads(Path(job_path).read_text())
    result = {"host_int8_exact": int8_products_exact(), "exact_copy_exact": int8_products_exact(True)}
    outputs = {}
    for name, (model, inputs) in job["models"].items():
        x = np.load(inputs)["x"]
        outputs[f"{name}.target"] = target_outputs(model, x)
        outputs[f"{name}.default"] = OnnxPredictor(model).predict(x)
    np.savez(job["outputs"], **outputs)  # type: ignore[arg-type]
    Path(job["result"]).write_text(json.dumps(result))


_SUITE = """
import sys, torch
torch.backends.mkldnn.enabled = False
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/export", "-k", "not saturate", *sys.argv[1:]]))
"""


if __name__ == "__main__":
    if sys.argv[1:2] == ["suite"]:
        if emulator() is None:
            sys.exit("needs qemu-x86_64 (apt-get install qemu-user) on an x86_64 machine")
        proc = subprocess.run([str(emulator()), "-cpu", CPU_WITHOUT_VNNI, sys.executable, "-c", _SUITE,
                               *sys.argv[2:]], env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
        sys.exit(proc.returncode)
    _main(sys.argv[1])
