"""What machine a result came from: CPU model, cores, ISA flags, GPU, library versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimddp")
LIBRARIES = (
    "torch",
    "segmentation-models-pytorch",
    "numpy",
    "onnx",
    "onnxruntime",
    "openvino",
    "nvidia-modelopt",
    "torch-pruning",
    "tensorrt",
)


def cpu_info() -> dict:
    """CPU model, cores, the ISA flags speed depends on, and the family / model numbers (an AMD "model name" can be just
    "AMD EPYC", which names neither generation nor vector units: family 25 model 1 is Zen 3, AVX2 only; model 17 Zen 4)."""
    model, flags, numbers = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("cpu family", "model") and value.strip().isdigit():
                    numbers.setdefault("family" if key == "cpu family" else "model_number", int(value))
                elif key in ("flags", "Features"):
                    flags = set(value.split())
    except OSError:
        pass
    return {
        "model": model,
        **numbers,
        "cores": os.cpu_count(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "arch": platform.machine(),
    }


def cpu_line(cpu: dict, threads: int | None = None) -> str:
    """How a report names the CPU its figures came from, e.g. 'AMD EPYC (family 25 model 1), 2 cores (avx2, fma)';
    with `threads`, the threads the run used instead of the cores. A record from before family / model were kept
    (or from a CPU that reports none) goes without them."""
    name = cpu.get("model", "?")
    if cpu.get("family") is not None and cpu.get("model_number") is not None:
        name += f" (family {cpu['family']} model {cpu['model_number']})"
    count = f"{threads} threads" if threads is not None else f"{cpu.get('cores', '?')} cores"
    return f"{name}, {count} ({', '.join(cpu.get('isa') or []) or 'no AVX2, AVX-512 or AMX'})"


def keep_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Stop glibc from returning every large freed block to the kernel (mmap/munmap per tensor).

    PyTorch on the CPU allocates and frees its large activation tensors on every batch; glibc serves each from a
    fresh mmap and unmaps it on free, so every batch page-faults its memory in again: measured here, `eval` of 5
    patients spent 14.7 of 62 s in the kernel, 0.9 s with this. Heap memory is kept for reuse instead (up to
    `trim_threshold` bytes are not trimmed). Process-wide, so the CLI calls it; a Python user may. No-op off glibc.
    """
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, trim_threshold))
    except (OSError, AttributeError):
        return False


def cpu_has_bf16(isa: list[str] | None = None) -> bool:
    """Native bfloat16 arithmetic on this CPU (AVX512-BF16 or AMX): bf16 runs without emulation."""
    isa = cpu_info()["isa"] if isa is None else isa
    return any(flag in isa for flag in ("avx512_bf16", "amx_bf16"))


def cpu_has_amx_bf16(isa: list[str] | None = None) -> bool:
    """AMX bf16 tiles: the only CPUs where bf16 autocast trained faster than FP32 is expected. On AVX512-BF16 alone
    it was measured slower than FP32 channels-last (benchmarks/results/recipe/train_speed*.md)."""
    isa = cpu_info()["isa"] if isa is None else isa
    return "amx_bf16" in isa


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def gpu_info() -> list[dict]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append(
            {
                "name": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
            }
        )
    return out


def machine_info() -> dict:
    return {"os": platform.platform(), "cpu": cpu_info(), "gpus": gpu_info(), "libraries": library_versions()}
