"""Keep the runtimes quiet: no telemetry, no device ids or consent files in HOME or TMPDIR.

What each installed runtime writes with an empty ``HOME`` and ``TMPDIR``, measured with
ONNX Runtime 1.32, OpenVINO 2026.4 (openvino-telemetry 2025.2), NNCF 3.4 and MNN 3.6 on Linux
(``HOME=$(mktemp -d) TMPDIR=$(mktemp -d) python -c 'import onnxruntime'`` and so on):

- ONNX Runtime (1DS telemetry, Linux since 1.29): ``import onnxruntime`` alone writes
  ``~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db}`` (a queue of
  events: OS, Python path, a device-id hash) and ``$TMPDIR/.ses``. ``disable_telemetry_events()``
  after import does not prevent it. The documented opt-out, ``ORT_DISABLE_TELEMETRY=1`` set
  before the import, does: nothing is written.
- OpenVINO: ``import openvino`` (its ``tools.ovc`` initializes openvino-telemetry) and ``import
  nncf`` write ``~/intel/openvino_ga_cid`` and ``~/intel/stats``, and telemetry is on unless
  ``~/intel/openvino_telemetry`` says "0" (openvino-telemetry's documented opt-out is the
  ``opt_in_out --opt_out`` script, which writes that file into HOME). Its only environment
  switch is ``CI=true``, which other tools read too. Both OpenVINO and NNCF fall back to a
  do-nothing stub when ``import openvino_telemetry`` fails (``ovc/telemetry_utils.py``,
  ``nncf/telemetry/wrapper.py``), so ``quiet_runtimes`` makes that import fail in this process
  before deploykit imports either; NNCF's documented ``NNCF_CI`` variable stubs it as well.
- MNN: ``import MNN`` and the ``_tools`` extension write nothing. Its Python ``MNN.tools``
  wrappers install and call a logging SDK; deploykit never imports them.
- OpenVINO writes a model cache only when ``CACHE_DIR`` is set; deploykit never sets it.

``import deploykit`` sets ``QUIET_ENV`` (``os.environ.setdefault``), so the CLI, a user's program
that imports deploykit before a runtime, and every child process deploykit starts (they inherit
the environment; ``deploykit.procs`` passes it explicitly) run with telemetry off. The bundle's
standalone runner, which runs without deploykit, sets the same variables itself.
"""
from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

QUIET_ENV = {"ORT_DISABLE_TELEMETRY": "1", "NNCF_CI": "1"}

_done = False


def quiet_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with every telemetry switch off."""
    env = dict(os.environ if base is None else base)
    for key, value in QUIET_ENV.items():
        if not env.get(key):
            env[key] = value
    return env


def quiet_runtimes() -> None:
    """Turn runtime telemetry off for this process (and the children it starts). Idempotent.

    Call before importing onnxruntime, openvino or nncf; the backends do.
    """
    global _done
    if _done:
        return
    os.environ.update(quiet_env())
    if "openvino_telemetry" in sys.modules and sys.modules["openvino_telemetry"] is not None:
        logger.debug("openvino_telemetry was imported before deploykit could block it")
    else:
        # A None entry makes `import openvino_telemetry` raise ImportError -> the stubs are used.
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
    _done = True


def quiet_onnxruntime() -> None:
    """Windows (ETW) telemetry off; on Linux ORT_DISABLE_TELEMETRY, set before import, does it."""
    if "onnxruntime" not in sys.modules:
        quiet_runtimes()
    import onnxruntime

    onnxruntime.disable_telemetry_events()


def private_caches() -> None:
    """For the ``deploykit`` command: point PyTorch's compile cache at a per-process folder removed at exit.

    ``import torch._dynamo`` (which tracing and MAC counting pull in) creates
    ``$TMPDIR/torchinductor_$USER`` even when nothing is compiled. A library import leaves
    this alone (the user's program owns its torch settings); so does a set variable.
    """
    import atexit
    import shutil
    import tempfile

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    # The name follows deploykit.files' temporary-folder pattern: a killed run's is removed by the next.
    path = os.path.join(tempfile.gettempdir(), f"deploykit-torch-p{os.getpid()}-cache")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    atexit.register(shutil.rmtree, path, True)
