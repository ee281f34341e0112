"""Which machine and which software produced a result row.

The device fingerprint names the hardware and OS (CPU model and core design, ISA flags that
change which kernels the runtimes pick, cores, memory, GPU); its ``id`` is a hash of the
hardware facts and the OS family only, so rows from one machine group together across runs and
across upgrades.
The kernel release, GPU driver and CUDA runtime are recorded beside it (``os``, ``gpus``), as
are tool versions, but none is in the id: the report marks rows whose versions differ instead of
treating them as another device.
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
# Holds every backend's ``distributions`` (a test keeps it so: this module sits below the backends).
DISTRIBUTIONS = ("deploykit", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf", "MNN",
                 "tensorrt", "tensorrt-cu12", "tensorrt-cu13", "numpy")


# /proc/cpuinfo fields naming the core design, first CPU's: a VM's model name can be as bare as
# "AMD EPYC" for several generations with one ISA list (Zen 1 and Zen 3 both: AVX2, FMA, F16C),
# whose speeds differ by 2x; x86's CPUID family/model and arm's implementer/part tell them apart.
CPU_ID_FIELDS = {"vendor_id": "{}", "cpu family": "family {}", "model": "model {}",
                 "CPU implementer": "implementer {}", "CPU part": "part {}"}


def _cpuinfo(text: str) -> dict[str, Any]:
    model, flags, physical, ident = None, set(), set(), {}
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
        if key in CPU_ID_FIELDS and value and key not in ident:
            ident[key] = CPU_ID_FIELDS[key].format(value)
    cpu_id = " ".join(ident[k] for k in CPU_ID_FIELDS if k in ident) or None
    return {"model": model, "flags": flags, "physical_cores": len(physical) or None, "cpu_id": cpu_id}


def same_cpu(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two device fingerprints name one CPU design (a fingerprint recorded before ``cpu_id``
    existed is matched by name and architecture alone)."""
    same = (a.get("cpu"), a.get("arch")) == (b.get("cpu"), b.get("arch"))
    return same and (not a.get("cpu_id") or not b.get("cpu_id") or a["cpu_id"] == b["cpu_id"])


def describe_cpu(device: dict[str, Any]) -> str:
    """The CPU's name with its core design where known: "AMD EPYC (AuthenticAMD family 23 model 1)"."""
    name = device.get("cpu") or "unknown CPU"
    return f"{name} ({device['cpu_id']})" if device.get("cpu_id") else name


# macOS: sysctl names -> the ISA names above (arm64 features, then x86 feature words).
MACOS_ISA = {
    "hw.optional.neon": "NEON", "hw.optional.arm.FEAT_DotProd": "NEON-DOTPROD", "hw.optional.arm.FEAT_I8MM": "I8MM",
    "hw.optional.avx2_0": "AVX2", "hw.optional.fma": "FMA", "hw.optional.avx512f": "AVX-512F",
    "hw.optional.avx512bw": "AVX-512BW", "hw.optional.avx512vnni": "AVX512-VNNI",
}


def _macos_cpu(sysctl: dict[str, str]) -> dict[str, Any]:
    """The /proc/cpuinfo facts from ``sysctl`` values (macOS has no /proc)."""
    isa = {name for key, name in MACOS_ISA.items() if sysctl.get(key, "0").strip() == "1"}
    flags = {flag for flag, name in ISA_FLAGS.items() if name in isa}
    cores = sysctl.get("hw.physicalcpu", "").strip()
    return {"model": sysctl.get("machdep.cpu.brand_string", "").strip() or None, "flags": flags,
            "physical_cores": int(cores) if cores.isdigit() else None}


def _sysctl(names: list[str]) -> dict[str, str]:
    values = {}
    for name in names:
        try:
            values[name] = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5,
                                          check=True).stdout
        except (OSError, subprocess.SubprocessError):
            continue
    return values


def _cpu() -> dict[str, Any]:
    if sys.platform == "darwin":
        return _macos_cpu(_sysctl(["machdep.cpu.brand_string", "hw.physicalcpu", *MACOS_ISA]))
    return _cpuinfo(_read("/proc/cpuinfo"))


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
    cpu = _cpu()
    facts = {
        "cpu": cpu["model"] or platform.processor() or platform.machine(),
        "cpu_id": cpu.get("cpu_id"),  # CPUID family/model (x86), implementer/part (arm); None: not exposed
        "arch": platform.machine(),
        "isa": [name for flag, name in ISA_FLAGS.items() if flag in cpu["flags"]],
        "logical_cores": os.cpu_count(),
        "physical_cores": cpu["physical_cores"],
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "os": platform.platform(),
        "gpus": gpus(),
    }
    return {"id": device_id(facts), **facts}


# GPU facts that change with a driver or CUDA upgrade: recorded, not part of the device's identity.
_GPU_SOFTWARE = ("driver", "cuda_runtime")


def device_id(facts: dict[str, Any]) -> str:
    """Hash of the hardware facts and the OS family (not its release, not the GPU driver)."""
    identity = {k: v for k, v in facts.items() if k not in ("id", "os", "gpus")}
    identity["os"] = platform.system()
    identity["gpus"] = [{k: v for k, v in gpu.items() if k not in _GPU_SOFTWARE} for gpu in facts.get("gpus", [])]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


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


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def bound_threads(requested: int, *, what: str = "--threads") -> int:
    """``requested`` capped at ``usable_cpus()``, with a warning when capped.

    More runtime threads than CPUs only oversubscribe them; an absurd count (``--threads
    100000``) would otherwise spawn that many threads in each runtime's pool.
    """
    usable = usable_cpus()
    if requested > usable:
        logger.warning("%s %d is more than the %d CPUs this process may use; using %d", what, requested, usable, usable)
        return usable
    return requested
