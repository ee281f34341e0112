"""Which machine and which software produced a result row.

The device fingerprint names the hardware and OS (CPU model, ISA flags that change which
kernels the runtimes pick, cores, memory, GPU); its ``id`` is a hash of those facts, so rows
from one machine group together across runs. Tool versions are recorded beside it, not in
the id: the report marks rows whose versions differ instead of treating them as another device.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import deploykit

logger = logging.getLogger(__name__)

# /proc/cpuinfo flag -> the name shown in reports: every flag that changes which kernels a runtime
# picks. VNNI and AMX-INT8 decide whether INT8 pays off; AVX512-BF16/AMX-BF16 and AVX512-FP16/AMX-FP16
# whether bf16/fp16 compute natively (deploykit.precision); AVX-NE-CONVERT + AVX-VNNI-INT8 are
# OpenVINO's avx2_vnni_2 path for bf16/fp16 on AVX2-only cores.
ISA_FLAGS = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512F",
    "avx512bw": "AVX-512BW",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "avx512_fp16": "AVX512-FP16",
    "avx512vl": "AVX-512VL",
    "avx512dq": "AVX-512DQ",
    "f16c": "F16C",
    "avx_vnni_int8": "AVX-VNNI-INT8",
    "avx_ne_convert": "AVX-NE-CONVERT",
    "amx_tile": "AMX-TILE",
    "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
    "amx_fp16": "AMX-FP16",
    "bf16": "BF16",
    "asimdhp": "ASIMD-HP",
    "asimd": "NEON",
    "asimddp": "NEON-DOTPROD",
    "i8mm": "I8MM",
    "sve": "SVE",
}

# Python distributions whose versions decide what a benchmark measures.
DISTRIBUTIONS = ("deploykit", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf", "MNN",
                 "tensorrt", "numpy")


def _cpuinfo(text: str) -> dict[str, Any]:
    model, flags, physical = None, set(), set()
    core = {}
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("model name", "Model", "Hardware", "cpu model") and model is None and value:
            model = value
        elif key in ("flags", "Features"):
            flags.update(value.split())
        elif key in ("physical id", "core id"):
            core[key] = value
            if len(core) == 2:
                physical.add((core["physical id"], core["core id"]))
                core = {}
    return {"model": model, "flags": flags, "physical_cores": len(physical) or None}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _memory_bytes() -> int | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _nvidia_driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _nvidia_device_present() -> bool:
    """An NVIDIA kernel driver is loaded; without one there is no CUDA device to ask torch about."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def gpus() -> list[dict[str, Any]]:
    """CUDA devices as torch sees them; empty without torch or without a GPU.

    torch is imported only where an NVIDIA driver is loaded (or torch already is), so that
    fingerprinting an ``.onnx`` build on a CPU machine does not pay for importing it.
    """
    if "torch" not in sys.modules and not _nvidia_device_present():
        return []
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    driver = _nvidia_driver()
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append({
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_bytes": int(props.total_memory),
            "driver": driver,
            "cuda_runtime": torch.version.cuda,
        })
    return found


@lru_cache(maxsize=1)
def device_fingerprint() -> dict[str, Any]:
    """The hardware and OS facts, with an ``id`` hashing them."""
    cpu = _cpuinfo(_read("/proc/cpuinfo"))
    facts = {
        "cpu": cpu["model"] or platform.processor() or platform.machine(),
        "arch": platform.machine(),
        "isa": [name for flag, name in ISA_FLAGS.items() if flag in cpu["flags"]],
        "logical_cores": os.cpu_count(),
        "physical_cores": cpu["physical_cores"],
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "os": platform.platform(),
        "gpus": gpus(),
    }
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]
    return {"id": digest, **facts}


def tool_versions() -> dict[str, str]:
    """Installed versions of deploykit, the runtimes and their main dependencies."""
    versions = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    versions["deploykit"] = deploykit.__version__
    return versions


def load_average() -> float | None:
    """1-minute load average (recorded with each row): a busy machine makes noisy numbers."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
