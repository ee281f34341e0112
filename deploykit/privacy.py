"""Keep the runtimes quiet: no telemetry, no consent or cache files in the user's home.

What the installed packages do, read from their source (OpenVINO 2026.4, NNCF 3.4,
openvino-telemetry 2025.2, ONNX Runtime 1.32):

- ``openvino.tools.ovc`` (behind ``openvino.convert_model``) and ``nncf`` create an
  ``openvino_telemetry.Telemetry`` with ``enable_opt_in_dialog=False``: telemetry is *on*
  unless ``~/intel/openvino_telemetry`` says "0", and the consent directory is created in
  ``$HOME``. Both fall back to a do-nothing stub when ``import openvino_telemetry`` fails
  (``ovc/telemetry_utils.py``, ``nncf/telemetry/wrapper.py``), so we make that import fail
  for this process. The only environment switch openvino-telemetry reads is ``CI=true``
  (``disable_in_ci``); we do not set it, because other tools change behaviour under CI.
- NNCF also replaces its telemetry by a stub when ``NNCF_CI`` is set (its documented CI switch).
- ONNX Runtime sends telemetry only on Windows (ETW); ``disable_telemetry_events()`` turns it
  off there and is harmless elsewhere. It writes no cache.
- OpenVINO writes a model cache only when ``CACHE_DIR`` is set; deploykit never sets it.
- MNN: the Python wrappers in ``MNN.tools`` install and call a logging SDK; deploykit never
  imports them and calls the converter and quantizer in the ``_tools`` extension directly.
"""
from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

_done = False


def quiet_runtimes() -> None:
    """Turn runtime telemetry off for this process (and the children it starts). Idempotent.

    Call before importing openvino or nncf; the backends do.
    """
    global _done
    if _done:
        return
    if not os.environ.get("NNCF_CI"):
        os.environ["NNCF_CI"] = "1"
    if "openvino_telemetry" in sys.modules and sys.modules["openvino_telemetry"] is not None:
        logger.debug("openvino_telemetry was imported before deploykit could block it")
    else:
        # A None entry makes `import openvino_telemetry` raise ImportError -> the stubs are used.
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]
    _done = True


def quiet_onnxruntime() -> None:
    import onnxruntime

    onnxruntime.disable_telemetry_events()
