"""Where a number was measured: CPU model and ISA level (or GPU name), threads, torch version.

Speed on a CPU depends on its instruction set far more than on its clock: bf16 matmuls run natively with
AVX-512-BF16 or AMX and are ~100x slower than fp32 on an AVX2-only CPU. Every benchmark output and
results table carries :func:`describe`'s line so a figure is never read without its machine.

    >>> describe()
    'Intel(R) Xeon(R) Processor, AMX (torch: AVX512), 2 threads, torch 2.14.1'
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# (ISA level, the /proc/cpuinfo flags that mean it), best first
ISA_LEVELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("AMX", ("amx_bf16", "amx_tile")),
    ("AVX-512-BF16", ("avx512_bf16",)),
    ("AVX-512", ("avx512f",)),
    ("AVX2", ("avx2",)),
)
_TORCH_LEVELS = {"AVX512": "AVX-512", "AVX2": "AVX2"}
# environment variables that cap the instruction set the libraries use below what the CPU has: with all three at
# AVX2 an AVX-512/AMX CPU computes like an AVX2-only one (bf16 matmul ~100x slower than fp32), which is how the
# AVX2 path is measured on a machine without such a CPU (docs/notebook/2026-11-cpu-speed.md)
AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
ISA_LIMIT_VARS = tuple(AVX2_CAPS)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The first CPU's ``flags`` from ``/proc/cpuinfo`` (empty where there is none: macOS, Windows)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def isa_level(flags: set[str] | None = None, torch_capability: str | None = None) -> str:
    """AMX / AVX-512-BF16 / AVX-512 / AVX2 from the CPU flags, else torch's own dispatch level."""
    flags = cpu_flags() if flags is None else flags
    for level, needed in ISA_LEVELS:
        if all(f in flags for f in needed):
            return level
    cap = torch_capability or torch.backends.cpu.get_cpu_capability()
    return _TORCH_LEVELS.get(cap, cap)


def isa_limits(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The :data:`ISA_LIMIT_VARS` set in this process's environment (empty: the libraries use all the CPU has)."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in ISA_LIMIT_VARS if environ.get(k)}


def cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name") and ":" in line:
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def info(device: torch.device | str = "cpu") -> dict:
    """The facts as a dict (for JSON results)."""
    device = torch.device(device)
    out = {"cpu": cpu_model(), "isa": isa_level(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device.type}
    if limits := isa_limits():
        out["isa_limits"] = limits
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
    return out


def describe(device: torch.device | str = "cpu") -> str:
    """One line: ``GPU name (CUDA x)`` on CUDA, else ``CPU model, ISA (torch: level)``; threads, torch."""
    i = info(device)
    caps = "".join(f" {k}={v}" for k, v in i.get("isa_limits", {}).items())
    where = (f"{i['gpu']} (CUDA {i['cuda']}), host {i['cpu']}" if "gpu" in i
             else f"{i['cpu']}, {i['isa']} (torch: {i['torch_cpu_capability']})" + (f", limited by{caps}" if caps else ""))
    return f"{where}, {i['threads']} threads, torch {i['torch']}"


__all__ = ["AVX2_CAPS", "ISA_LEVELS", "ISA_LIMIT_VARS", "cpu_flags", "cpu_model", "describe", "info", "isa_level", "isa_limits"]
