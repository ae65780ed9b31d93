"""The device and its numbers: which precision to train in, and each GPU's peak for MFU.

Owns: the precision choice (bf16 from compute capability 8.0, fp16 + GradScaler on a T4, never trusting
is_bf16_supported()), CPU bf16 detection, peak FLOPS, autocast, compile on/off.
Imports: common.
"""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

from .common import PocketGPTError

# Dense peak TFLOPS per GPU: (16-bit tensor cores, fp32). T4's 65 is fp16 (it has no bf16 units).
PEAK_TFLOPS = {"H200": (989, 67), "H100": (989, 67), "A100": (312, 19.5), "L40S": (362, 91.6), "L4": (121, 30.3),
               "A10": (125, 31.2), "V100": (125, 15.7), "T4": (65, 8.1), "P100": (18.7, 9.3)}


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU computes bf16 matmuls in hardware (measured 1.9x fp32 here at 27M)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def choose_precision(requested: str = "auto") -> str:
    """bf16 on compute capability >= 8.0, fp16 (+GradScaler) on a T4/P100/V100, fp32 or bf16 on a CPU.

    torch.cuda.is_bf16_supported() answers True on a T4, where bf16 is emulated and slow, so the
    decision is made on the compute capability itself.
    """
    if torch.cuda.is_available():
        native_bf16 = torch.cuda.get_device_capability()[0] >= 8
        if requested == "auto":
            return "bf16" if native_bf16 else "fp16"
        if requested == "bf16" and not native_bf16:
            raise PocketGPTError(f"precision='bf16': {torch.cuda.get_device_name()} has no native bf16 "
                                 f"(compute capability < 8.0). Use precision='fp16' or 'auto'.")
        return requested
    if requested == "fp16":
        raise PocketGPTError("precision='fp16' needs a GPU; on a CPU use 'auto', 'bf16' or 'fp32'.")
    if requested == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return requested


def newton_schulz_precision(requested: str, device) -> str:
    """Muon's Newton-Schulz precision for `requested="auto"`: on a GPU, bf16 where it computes bf16 natively
    (compute capability >= 8.0) and fp32 below (a T4 emulates bf16: about 2 TFLOPS upstream, against 8 for its
    fp32; fp16 is unstable for the iteration, and nanochat runs it in fp32 below sm_80). On a CPU, bf16 as
    torch.optim.Muon: measured faster than fp32 even on a CPU without native bf16 (tools/ns_precision.py:
    Muon's step 0.29 s against 0.90 s at the t4 shape on this project's 2-core AVX2 CPU)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
    return "bf16"


def peak_flops(device, precision: str) -> float | None:
    """The device's dense peak for the precision in use; None on a CPU (no honest MFU there)."""
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device), precision)


def peak_for_name(name: str, precision: str) -> float | None:
    """Look a GPU's name up by whole words ("NVIDIA L40S" is not an "L4")."""
    words = set(re.findall(r"[A-Za-z0-9]+", name.upper()))
    for key, (half, single) in PEAK_TFLOPS.items():
        if key in words:
            return (single if precision == "fp32" else half) * 1e12
    return None


def device_name(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} x{torch.cuda.device_count()}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def autocast(device, precision: str):
    """bf16/fp16 autocast for the forward pass; a no-op context in fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# compile="auto" on a CPU: only in a session this long. Measured at the demo shape on a 2-core CPU (README):
# compiling costs 80-90 s and makes a step 1.2-1.5x faster, so it repays itself after 5 to 10 minutes of steps,
# and the demo's 6-minute session trains no more steps with it. One shape on one busy CPU: "auto" asks for a
# session ten times that long before it counts on it.
CPU_COMPILE_MIN_HOURS = 2.0


def resolve_compile(setting, max_hours: float = 0.0) -> bool:
    """compile="auto": on a GPU, and on a CPU only for a session of at least CPU_COMPILE_MIN_HOURS; True/False force
    it (a compile that fails stops a stage with compile=True and falls back to eager with "auto": train.py)."""
    if setting == "auto":
        return torch.cuda.is_available() or max_hours >= CPU_COMPILE_MIN_HOURS
    if isinstance(setting, str):
        return setting.lower() in ("true", "1", "yes")
    return bool(setting)
