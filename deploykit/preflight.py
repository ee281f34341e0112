"""Preflight: can this machine build and run TensorRT engines? Checked before every build.

Probing (``gather_facts``: nvidia-smi, torch.cuda, the tensorrt package) is kept apart from
judging (``evaluate``: facts -> checks with a status and a one-line fix), so the judgement is
tested on any machine. What this module has been run on: CPU-only machines without TensorRT
(deploykit's CI). Its GPU branches follow the documented nvidia-smi query interface and
TensorRT's support matrix; they have not been executed by deploykit's tests.

The GPU recorded is the one the runtime uses: CUDA device 0 of this process as PyTorch sees
it (``CUDA_VISIBLE_DEVICES`` respected), matched to its nvidia-smi row by UUID. nvidia-smi
alone lists every GPU in PCI order whatever ``CUDA_VISIBLE_DEVICES`` says, and CUDA numbers
them fastest first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so without CUDA PyTorch a row is
chosen only where that numbering is unambiguous (:func:`select_gpu`).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Any

from deploykit.errors import DeployError, MissingBackendError

logger = logging.getLogger(__name__)

TARGET = "tensorrt"
NEEDS = "an NVIDIA GPU and TensorRT"
MIN_TENSORRT_MAJOR = 10  # explicit quantization + strongly typed networks + execute_async_v3
# Current TensorRT 10.x/11.x releases support compute capability 7.5 (Turing) and newer;
# the first 10.x releases still ran on Volta (7.0), hence a warning there and a failure
# below 7.0 only.
MIN_COMPUTE_CAPABILITY = (7, 5)
OLDEST_COMPUTE_CAPABILITY = (7, 0)

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
FIX_TENSORRT = ("pip install 'deploykit[tensorrt]' (TensorRT wheels come from NVIDIA's index, pypi.nvidia.com; "
                "the extra brings onnxruntime too) and a CUDA build of PyTorch (see the cuda check)")
FIX_GPU = "run on a machine with an NVIDIA GPU and its driver (nvidia-smi must work)"
# deploykit pins torch==2.13.0, and its CPU and CUDA builds share that version number; a
# package's metadata cannot name the index a build comes from, so the tensorrt extra cannot
# bring the CUDA build (and pinning one would break CPU installs). The message says how.
FIX_TORCH_CUDA = ("install PyTorch 2.13.0's CUDA build: pip install --force-reinstall torch==2.13.0 "
                  "--index-url https://download.pytorch.org/whl/cu<CUDA> with the <CUDA> for this driver "
                  "from https://pytorch.org/get-started/locally/ (e.g. cu128)")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warn, fail, skip
    detail: str
    fix: str = ""

    @property
    def passed(self) -> bool:
        return self.status in (OK, WARN)


@dataclass
class Facts:
    """What the probes found; None where a probe could not tell."""

    gpu_name: str | None = None
    driver_version: str | None = None
    compute_capability: str | None = None  # "9.0"
    gpu_probe: str = ""  # how the GPU was (not) found
    gpu_uuid: str | None = None  # of CUDA device 0 of this process
    cuda_version: str | None = None  # the CUDA runtime PyTorch was built with
    torch_cuda_available: bool = False
    tensorrt_version: str | None = None
    tensorrt_error: str | None = None  # installed but not importable (missing libnvinfer, ...)

    def environment(self) -> dict[str, Any]:
        """The facts an engine is tied to, as recorded in build.json."""
        return {
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "cuda_version": self.cuda_version,
            "driver_version": self.driver_version,
        }


def parse_nvidia_smi(text: str) -> list[dict[str, str]]:
    """Rows of ``nvidia-smi --query-gpu=name,driver_version,compute_cap[,uuid] --format=csv,noheader``."""
    rows = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2 and parts[0]:
            row = {"name": parts[0], "driver_version": parts[1],
                   "compute_capability": parts[2] if len(parts) > 2 and parts[2] not in ("", "[N/A]") else ""}
            if len(parts) > 3 and parts[3]:
                row["uuid"] = parts[3]
            rows.append(row)
    return rows


def _same_uuid(a: str, b: str) -> bool:
    """nvidia-smi writes GPU-<hex>; PyTorch prints the bare hex; CUDA_VISIBLE_DEVICES may hold a prefix."""
    a, b = (u.strip().lower().removeprefix("gpu-") for u in (a, b))
    return bool(a and b) and (a.startswith(b) or b.startswith(a))


def select_gpu(rows: list[dict[str, str]], *, uuid: str | None = None, visible: str | None = None,
               order: str | None = None) -> tuple[dict[str, str] | None, str]:
    """The nvidia-smi row of CUDA device 0 of this process, and how it was chosen (or why not).

    ``uuid``: the device's UUID from the runtime (PyTorch), the reliable way. Otherwise from
    ``visible`` (CUDA_VISIBLE_DEVICES) and ``order`` (CUDA_DEVICE_ORDER): a UUID entry matches
    directly; an index maps to an nvidia-smi row only in PCI order, or where every GPU is the
    same model (the identity recorded is then the same whichever it is).
    """
    if not rows:
        return None, "nvidia-smi lists no GPU"
    if uuid:
        row = next((r for r in rows if _same_uuid(r.get("uuid", ""), uuid)), None)
        return row, "the runtime's device, by UUID" if row else f"device {uuid} not in nvidia-smi's list (MIG?)"
    if visible is not None and not visible.strip():
        return None, "CUDA_VISIBLE_DEVICES is empty: no GPU visible"
    first = (visible or "0").split(",")[0].strip()
    if not first.isdigit():
        row = next((r for r in rows if _same_uuid(r.get("uuid", ""), first)), None)
        return row, f"CUDA_VISIBLE_DEVICES={first}" if row else f"CUDA_VISIBLE_DEVICES={first} matches no GPU listed"
    index = int(first)
    if index >= len(rows):
        return None, f"CUDA_VISIBLE_DEVICES={visible} names GPU {index}; nvidia-smi lists {len(rows)}"
    if (order or "").strip().upper() == "PCI_BUS_ID":
        return rows[index], f"GPU {index} in PCI order"
    if len({(r["name"], r["compute_capability"]) for r in rows}) == 1:
        return rows[index], f"GPU {index} (all {len(rows)} GPUs are the same model)"
    return None, (f"nvidia-smi lists {len(rows)} different GPUs and CUDA numbers them fastest first: "
                  "set CUDA_DEVICE_ORDER=PCI_BUS_ID or install PyTorch with CUDA")


def _probe_nvidia_smi(facts: Facts) -> list[dict[str, str]]:
    """Every GPU nvidia-smi lists (all of them: it ignores CUDA_VISIBLE_DEVICES)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        facts.gpu_probe = "nvidia-smi not on PATH"
        return []
    # compute_cap is a query field since driver 510; older drivers reject it, so ask twice.
    for fields in ("name,driver_version,compute_cap,uuid", "name,driver_version"):
        try:
            done = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as err:
            facts.gpu_probe = f"nvidia-smi failed: {err}"
            return []
        if done.returncode == 0:
            rows = parse_nvidia_smi(done.stdout)
            facts.gpu_probe = f"nvidia-smi: {len(rows)} GPU(s)" if rows else "nvidia-smi lists no GPU"
            if rows:
                facts.driver_version = rows[0]["driver_version"]  # one driver per machine
            return rows
        message = (done.stderr or done.stdout).strip()
        facts.gpu_probe = f"nvidia-smi: {message.splitlines()[0] if message else f'exit {done.returncode}'}"
    return []


def _probe_torch(facts: Facts) -> None:
    try:
        import torch
    except ImportError:
        return
    facts.cuda_version = torch.version.cuda
    try:
        facts.torch_cuda_available = bool(torch.cuda.is_available())
    except RuntimeError:  # a broken driver install raises here
        facts.torch_cuda_available = False
    if facts.torch_cuda_available:
        # The device the runner and TensorRT's builder use: this process's current CUDA device
        # (0 unless changed), numbered within CUDA_VISIBLE_DEVICES.
        device = torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(device)
        facts.gpu_name = properties.name
        facts.compute_capability = f"{properties.major}.{properties.minor}"
        facts.gpu_uuid = str(getattr(properties, "uuid", "") or "") or None


def _probe_tensorrt(facts: Facts) -> None:
    if importlib.util.find_spec("tensorrt") is None:
        return
    try:
        import tensorrt
    except Exception as err:  # the wheel imports libnvinfer: OSError/ImportError when it is missing
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        facts.tensorrt_error = f"{type(err).__name__}: {first}"
        return
    facts.tensorrt_version = str(getattr(tensorrt, "__version__", "unknown"))


def gather_facts() -> Facts:
    """Probe this machine (nvidia-smi, torch.cuda, tensorrt). Takes a second or two."""
    facts = Facts()
    rows = _probe_nvidia_smi(facts)
    _probe_torch(facts)
    if facts.gpu_name is None and rows:  # no CUDA PyTorch: pick the row CUDA would call device 0
        row, how = select_gpu(rows, visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
                              order=os.environ.get("CUDA_DEVICE_ORDER"))
        facts.gpu_probe = f"{facts.gpu_probe}; {how}"
        if row is not None:
            facts.gpu_name, facts.compute_capability = row["name"], row["compute_capability"] or None
            facts.gpu_uuid = row.get("uuid")
    elif facts.gpu_uuid and rows:
        row, how = select_gpu(rows, uuid=facts.gpu_uuid)
        facts.gpu_probe = f"{facts.gpu_probe}; {how}"
        if row is not None:
            facts.driver_version = row["driver_version"]
    _probe_tensorrt(facts)
    return facts


def _version_tuple(text: str | None) -> tuple[int, ...]:
    out = []
    for part in (text or "").split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def evaluate(facts: Facts) -> list[Check]:
    """The TensorRT target's checks, judged from ``facts``."""
    has_gpu = facts.gpu_name is not None
    checks = [
        Check("nvidia gpu", OK, facts.gpu_name, "") if has_gpu
        else Check("nvidia gpu", FAIL, f"no NVIDIA GPU found ({facts.gpu_probe or 'not probed'})", FIX_GPU),
    ]
    if facts.driver_version:
        checks.append(Check("driver", OK, facts.driver_version))
    else:
        checks.append(Check("driver", FAIL if has_gpu else SKIP,
                            "driver version unknown" if has_gpu else "no GPU", FIX_GPU if has_gpu else ""))
    if facts.cuda_version is None:
        checks.append(Check("cuda", FAIL,
                            "PyTorch is a CPU-only build (deploykit runs engines through torch CUDA tensors)",
                            FIX_TORCH_CUDA))
    elif not facts.torch_cuda_available:
        checks.append(Check("cuda", FAIL, f"PyTorch built for CUDA {facts.cuda_version} sees no usable GPU",
                            "check the driver is new enough for this CUDA version (nvidia-smi shows the maximum)"))
    else:
        checks.append(Check("cuda", OK, f"CUDA {facts.cuda_version} (PyTorch)"))
    cc = _version_tuple(facts.compute_capability)
    if not cc:
        checks.append(Check("compute capability", SKIP, "unknown (no GPU)" if not has_gpu else "unknown"))
    elif cc < OLDEST_COMPUTE_CAPABILITY:
        checks.append(Check("compute capability", FAIL,
                            f"{facts.compute_capability}: TensorRT 10 needs 7.0 or newer (current releases 7.5)",
                            "use a Turing (7.5) or newer GPU"))
    elif cc < MIN_COMPUTE_CAPABILITY:
        checks.append(Check("compute capability", WARN,
                            f"{facts.compute_capability}: only early TensorRT 10 releases support it",
                            "use a Turing (7.5) or newer GPU"))
    else:
        checks.append(Check("compute capability", OK, facts.compute_capability))
    if facts.tensorrt_version is None:
        detail = f"installed but not importable: {facts.tensorrt_error}" if facts.tensorrt_error else "not installed"
        checks.append(Check("tensorrt", FAIL, detail, FIX_TENSORRT))
    elif _version_tuple(facts.tensorrt_version)[:1] < (MIN_TENSORRT_MAJOR,):
        too_old = f"TensorRT {facts.tensorrt_version} is too old; deploykit needs {MIN_TENSORRT_MAJOR} or newer"
        checks.append(Check("tensorrt", FAIL, too_old, "pip install --upgrade 'deploykit[tensorrt]'"))
    else:
        checks.append(Check("tensorrt", OK, f"TensorRT {facts.tensorrt_version}"))
    return checks


def require_tensorrt(facts: Facts | None = None) -> Facts:
    """Raise the one-line error when TensorRT engines cannot be built and run here."""
    facts = facts or gather_facts()
    checks = evaluate(facts)
    failed = [c for c in checks if c.status == FAIL]
    for c in failed:
        logger.info("preflight %s: %s (%s)", c.name, c.detail, c.fix)
    if any(c.name in ("nvidia gpu", "tensorrt") for c in failed):
        raise MissingBackendError(TARGET, NEEDS, TARGET)
    if failed:
        first = failed[0]
        raise DeployError(f"target {TARGET}: {first.name}: {first.detail}; {first.fix}")
    return facts


def checks_as_dicts(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]
