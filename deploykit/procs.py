"""Child processes deploykit starts (MNN's tools, bench's memory probe): quiet, and tied to us.

``run_python_module`` starts ``python -m MODULE`` with telemetry off (``privacy.quiet_env``)
and the parent's pid in ``DEPLOYKIT_PARENT_PID``; the child calls ``die_with_parent()`` first
thing. On Linux that is ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the child when
the thread that started it dies, ``kill -9`` included. Elsewhere a daemon thread polls the
parent's pid. Either way a child whose parent is already gone exits at once.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

PARENT_ENV = "DEPLOYKIT_PARENT_PID"
PR_SET_PDEATHSIG = 1
POLL_S = 1.0


def run_python_module(module: str, args: list[str], *, timeout: float, errors: str = "replace",
                      ) -> subprocess.CompletedProcess:
    """``python -m module args`` in a child that dies with this process; output captured."""
    from deploykit.privacy import quiet_env

    env = quiet_env()
    env[PARENT_ENV] = str(os.getpid())
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, errors=errors, env=env)


def _parent_gone(parent: int) -> bool:
    return os.getppid() != parent


def die_with_parent() -> None:
    """In a child started by ``run_python_module``: exit when the parent dies. No-op otherwise."""
    text = os.environ.get(PARENT_ENV, "")
    if not text.isdigit():
        return
    parent = int(text)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
        else:
            if _parent_gone(parent):  # died before prctl took effect
                os._exit(1)
            return

    def watch() -> None:
        while not _parent_gone(parent):
            time.sleep(POLL_S)
        os._exit(1)

    if _parent_gone(parent):
        os._exit(1)
    threading.Thread(target=watch, name="deploykit-parent-watch", daemon=True).start()
