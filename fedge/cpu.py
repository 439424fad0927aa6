"""What the host CPU is, as far as int8 and float16 inference cares.

Owns reading ``/proc/cpuinfo`` into a ``CpuInfo``: the CPU's name, its
architecture and the instruction-set features that decide how ONNX Runtime
computes int8 products (x86: AVX2, AVX-512, VNNI, AMX; ARM: NEON, the
dot-product instructions, i8mm) and float16. The export toolchain states it
beside every figure it measures, and a device reports it in its presence.

Why the features matter: on x86 without VNNI (SSE4.1, AVX2, AVX-512F/BW),
ONNX Runtime's u8 x s8 kernels multiply with ``vpmaddubsw``, which adds two
products into a signed 16-bit lane and saturates there; with VNNI
(``vpdpbusd``) or AMX, and on every ARM kernel (NEON widening multiplies,
SDOT, SMMLA), products accumulate exactly in 32 bits. Whether this host's
kernels really saturate is *measured* by ``fedge.onnxrt.int8_products_exact``;
the flags here say why.

Reads files only; imports neither NumPy nor ONNX Runtime.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

# Features worth naming, in the order they are listed.
X86_FEATURES = ("sse4_1", "avx2", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx_vnni_int8",
                "avx512_bf16", "avx512_fp16", "amx_int8")
ARM_FEATURES = ("asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2")
# CPU parts of ARM Ltd (implementer 0x41) found on edge boards; others are shown by number.
_ARM_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE",
    "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd4f": "Neoverse-V2",
}


@dataclass(frozen=True)
class CpuInfo:
    machine: str  # platform.machine(): x86_64, aarch64, ...
    model: str  # "AMD EPYC 7763", "Cortex-A72 (Raspberry Pi 4 Model B Rev 1.4)", or "" when unknown
    features: tuple[str, ...]  # the X86_FEATURES / ARM_FEATURES this CPU has

    @property
    def is_x86(self) -> bool:
        return self.machine in ("x86_64", "AMD64", "i386", "i686")

    @property
    def is_arm64(self) -> bool:
        return self.machine in ("aarch64", "arm64")

    @property
    def int8_dot(self) -> str:
        """The instructions ONNX Runtime's u8/s8 kernels use on this CPU."""
        f = set(self.features)
        if self.is_x86:
            if "amx_int8" in f:
                return "AMX"
            if f & {"avx512_vnni", "avx_vnni"}:
                return "VNNI"
            if "avx512bw" in f:
                return "AVX-512 without VNNI"
            if "avx2" in f:
                return "AVX2 without VNNI"
            return "SSE without VNNI"
        if self.is_arm64:
            if "i8mm" in f:
                return "NEON i8mm"
            if "asimddp" in f:
                return "NEON dot product"
            return "NEON"
        return "unknown"

    @property
    def int8_saturation_expected(self) -> bool:
        """True where ONNX Runtime's u8 x s8 kernels saturate 16-bit pair sums
        (x86 without VNNI or AMX). The probe in ``fedge.onnxrt`` measures it."""
        return self.is_x86 and not (set(self.features) & {"avx512_vnni", "avx_vnni", "amx_int8"})

    def describe(self) -> str:
        name = self.model or "unknown CPU"
        return f"{name} ({self.machine}, int8 via {self.int8_dot})"

    def to_json(self) -> dict[str, Any]:
        return {"machine": self.machine, "model": self.model, "features": list(self.features),
                "int8_dot": self.int8_dot}


def parse_cpuinfo(text: str, machine: str, board: str = "") -> CpuInfo:
    """``CpuInfo`` from the text of ``/proc/cpuinfo`` (first processor block)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and key and key not in fields:
            fields[key] = value.strip()
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    x86 = machine in ("x86_64", "AMD64", "i386", "i686")
    wanted = X86_FEATURES if x86 else ARM_FEATURES
    features = tuple(f for f in wanted if f in flags)
    if x86:
        model = fields.get("model name", "")
    else:
        part = fields.get("cpu part", "").lower()
        core = _ARM_PARTS.get(part, f"part {part}") if fields.get("cpu implementer", "").lower() == "0x41" else (
            f"implementer {fields['cpu implementer']} part {part}" if "cpu implementer" in fields else "")
        board = board or fields.get("model", "") or fields.get("hardware", "")
        model = f"{core} ({board})" if core and board else (core or board)
    return CpuInfo(machine, " ".join(model.split()), features)


def board_model() -> str:
    """The board's name from the device tree ("Raspberry Pi 4 Model B Rev 1.4"), or ""."""
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            return Path(path).read_text(errors="replace").strip("\x00\n ")
        except OSError:
            continue
    return ""


@lru_cache(maxsize=1)
def host_cpu() -> CpuInfo:
    machine = platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux
        return CpuInfo(machine, platform.processor(), ())
    return parse_cpuinfo(text, machine, board_model())
