"""The CPU features that decide INT8 and bf16 speed and correctness, read from the CPU itself.

Features come from NumPy's CPUID-based dispatch table (it asks the processor, so it is right under emulators and
in containers whose /proc/cpuinfo shows the host), plus /proc/cpuinfo for the flags NumPy does not track
(AVX-VNNI, AMX). OpenVINO's own choice of default precision is asked from OpenVINO, never inferred.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import openvino as ov


@dataclass(frozen=True)
class CpuFeatures:
    name: str
    avx2: bool
    avx512: bool
    #: AVX512-VNNI or AVX-VNNI: one-instruction u8×s8 dot products into int32 (exact).
    vnni: bool
    amx: bool
    #: AVX512-BF16 or AMX-BF16.
    bf16: bool
    #: What OpenVINO's CPU plugin runs float layers in when no precision hint is given ("bf16", "f32", ...).
    openvino_default_precision: str

    @property
    def ort_u8s8_arithmetic(self) -> str:
        """How ONNX Runtime multiplies u8 activations by s8 weights on this CPU."""
        if self.vnni or self.amx:
            return "VNNI/AMX (exact int32 dot products)"
        if self.avx2:
            return "VPMADDUBSW (int16 pairs, saturates on full-range weights: use --target portable files)"
        return "SSE (widening, exact)"

    def describe(self) -> str:
        flags = ", ".join(f"{label} {'yes' if value else 'no'}" for label, value in (
            ("AVX2", self.avx2), ("AVX512", self.avx512), ("VNNI", self.vnni), ("AMX", self.amx),
            ("bf16", self.bf16)))
        return (f"CPU {self.name}: {flags}; OpenVINO default precision {self.openvino_default_precision}; "
                f"ONNX Runtime u8×s8: {self.ort_u8s8_arithmetic}")

    def to_dict(self) -> dict[str, str]:
        return {"cpu": self.name, "avx2": str(self.avx2), "avx512": str(self.avx512), "vnni": str(self.vnni),
                "amx": str(self.amx), "bf16": str(self.bf16),
                "openvino_default_precision": self.openvino_default_precision}


@cache
def cpu_features() -> CpuFeatures:
    """This machine's features (read once per process)."""
    linux_flags, name = _proc_cpuinfo()
    return features_from_flags(
        _numpy_flags(), linux_flags, name or platform.processor() or platform.machine(),
        ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name(),
    )


def features_from_flags(numpy_flags: frozenset[str], linux_flags: frozenset[str], name: str,
                        openvino_default_precision: str) -> CpuFeatures:
    """The features NumPy's dispatch flags and the /proc/cpuinfo flags spell."""
    avx512 = "AVX512F" in numpy_flags
    return CpuFeatures(
        name=name,
        avx2="AVX2" in numpy_flags,
        avx512=avx512,
        vnni="AVX512VNNI" in numpy_flags or ("AVX2" in numpy_flags and "avx_vnni" in linux_flags),
        # The tile registers and the INT8 tile multiply: what OpenVINO's `avx512_core_amx` kernels need.
        amx=avx512 and {"amx_tile", "amx_int8"} <= linux_flags,
        bf16="AVX512BF16" in numpy_flags or (avx512 and "amx_bf16" in linux_flags),
        openvino_default_precision=openvino_default_precision,
    )


def _numpy_flags() -> frozenset[str]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    return frozenset(flag for flag, present in __cpu_features__.items() if present)


def _proc_cpuinfo() -> tuple[frozenset[str], str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset(), ""
    flags: frozenset[str] = frozenset()
    name = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
        elif key.strip() == "model name" and not name:
            name = value.strip()
    return flags, name
