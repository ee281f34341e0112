"""A real local Ray cluster for the fleet tests: a head and device nodes, each its own process.

Every node is `ray start --block` in a session of its own, so it can be stopped (SIGTERM) or
killed (SIGKILL to its whole process group, raylet and workers included) by process id; nothing
is stopped by name. Usage statistics are off, the dashboard is not started, memory is small.
Ray has no option to bind its services to loopback: a node's address is the machine's own
address (Ray replaces 127.0.0.1 with it), so traffic stays on this host but the ports listen on
every interface while the cluster runs.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
OBJECT_STORE_BYTES = 80 * 2**20
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    # The head notices a dead node within about 2 s instead of Ray's default 15-30 s.
    env.update(RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="1000",
               RAY_health_check_failure_threshold="3", RAY_health_check_initial_delay_ms="1000",
               RAY_raylet_start_wait_time_s="180",  # a loaded 2-core machine starts nodes slowly
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # stop at once: nothing to drain in a test
    return env


@dataclass
class LocalCluster:
    root: Path
    port: int
    client_port: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def client_address(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    def _start(self, name: str, args: list[str], cpus: list[int] | None = None) -> None:
        common = ["--block", "--disable-usage-stats", "--object-store-memory", str(OBJECT_STORE_BYTES)]
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        # A node pinned to some CPUs gives its workers that affinity: a different fingerprint.
        preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.processes[name] = subprocess.Popen([RAY, "start", *args, *common], env=ray_env(), stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True,
                                                preexec_fn=preexec, cwd=self.root)

    def start_head(self) -> None:
        self._start("head", ["--head", "--port", str(self.port), "--num-cpus", "0", "--include-dashboard", "false",
                             "--ray-client-server-port", str(self.client_port), "--temp-dir", str(self.root)])

    def wait_for_head(self, timeout_s: float = 120) -> None:
        """Until the head's `ray start` says the runtime started (device nodes then register)."""
        deadline = time.monotonic() + timeout_s
        log = self.root / "head.log"
        while "Ray runtime started" not in log.read_text():
            if self.processes["head"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)

    def add_device(self, label: str, cpus: list[int] | None = None) -> None:
        # Each node of one machine needs its own agent port (Ray's default, 52365, is one per machine).
        self._start(label, ["--address", self.address, "--num-cpus", "1", "--labels", f"device={label}",
                            "--dashboard-agent-listen-port", str(_free_port()),
                            "--resources", json.dumps({"deploykit-bench": 1})], cpus)

    def wait_for_devices(self, labels: list[str], timeout_s: float = 120) -> None:
        import ray

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            alive = {(n.get("Labels") or {}).get("device") for n in ray.nodes() if n["Alive"]}
            if set(labels) <= alive:
                return
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"ray node {name} exited: {(self.root / f'{name}.log').read_text()[-2000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"device nodes {labels} did not join within {timeout_s} s")

    def kill(self, name: str) -> None:
        """SIGKILL the node's whole process group: raylet, agents and workers die at once."""
        proc = self.processes.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self, timeout_s: float = 30) -> None:
        """Stop every node this cluster started: SIGTERM, then SIGKILL what is left of its group."""
        for proc in self.processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.processes.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (workers, agents)
            except ProcessLookupError:
                pass
            if proc.poll() is None:
                proc.wait(timeout=10)
        self.processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def new_cluster() -> LocalCluster:
    # A short root: Ray's unix sockets live under it and their paths are limited to ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="dk-ray-", dir="/tmp"))
    return LocalCluster(root, _free_port(), _free_port())
