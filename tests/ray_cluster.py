"""A real local Ray cluster for the fleet tests: a head and device nodes, each its own process.

Every node is `ray start --block` in a session of its own, so it can be stopped (SIGTERM) or
killed (SIGKILL to its whole process group, raylet and workers included) by process id; nothing
is stopped by name. Usage statistics are off, the dashboard is not started, memory is small.
Ray has no option to bind its services to loopback: it replaces 127.0.0.1 with the machine's own
address and listens on every interface. So the whole cluster, and every process that talks to
it, runs in a private network namespace made for it (`NetNamespace`: only `lo`, up), where the
only address is 127.0.0.1: nothing listens on, or sends to, the host's interfaces. Without the
namespace (not root, no `unshare`) there is no cluster: `NamespaceUnavailable`, never the host
network.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
OBJECT_STORE_BYTES = 80 * 2**20
REPO = Path(__file__).resolve().parents[1]


CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


class NamespaceUnavailable(RuntimeError):
    """A private network namespace cannot be made here (the cluster must not use the host network)."""


def _setns(fd: int) -> None:
    """Move the calling thread (or a child before exec) into the network namespace ``fd``."""
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _in_thread(fd: int, work):  # noqa: ANN001, ANN202 - a tiny helper
    """Run ``work()`` in a short-lived thread moved into namespace ``fd``; its result."""
    out: dict = {}

    def run() -> None:
        try:
            _setns(fd)
            out["value"] = work()
        except BaseException as err:  # re-raised in the caller
            out["error"] = err

    thread = threading.Thread(target=run, name="netns")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _lo_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, request + b"\0" * 22)[:18])[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP) + b"\0" * 22)


def listening_ports() -> set[tuple[str, int]]:
    """(address, port) of the TCP sockets listening in the calling thread's network namespace
    (from /proc: no `ss` needed)."""
    found = set()
    for name in ("tcp", "tcp6"):
        path = Path(f"/proc/thread-self/net/{name}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # LISTEN
                address, port = local.split(":")
                raw = bytes.fromhex(address)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
                family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
                found.add((socket.inet_ntop(family, words), int(port, 16)))
    return found


class NetNamespace:
    """A private network namespace with only ``lo`` (up), held by ``unshare --net sleep infinity``.

    ``preexec`` moves a child into it before exec; ``entered()`` moves the calling thread (a Ray
    driver started there keeps its threads in it). ``close()`` kills the holder by its pid.
    """

    def __init__(self) -> None:
        unshare = shutil.which("unshare")
        if os.geteuid() != 0:
            raise NamespaceUnavailable("a private network namespace for the Ray cluster needs root")
        if unshare is None:
            raise NamespaceUnavailable("a private network namespace for the Ray cluster needs unshare (util-linux)")
        self.host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        host = os.stat("/proc/thread-self/ns/net").st_ino
        self.holder = subprocess.Popen([unshare, "--net", "sleep", "infinity"], start_new_session=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        path = f"/proc/{self.holder.pid}/ns/net"
        deadline = time.monotonic() + 10
        while True:  # until the holder has exec'd sleep in its own namespace
            if self.holder.poll() is not None:
                why = self.holder.stderr.read().decode(errors="replace").strip() if self.holder.stderr else ""
                self.close()
                raise NamespaceUnavailable(f"unshare --net failed: {why or self.holder.returncode}")
            try:
                if os.stat(path).st_ino != host and os.readlink(f"/proc/{self.holder.pid}/exe").endswith("sleep"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise NamespaceUnavailable("unshare --net did not start within 10 s")
            time.sleep(0.02)
        self.fd = os.open(path, os.O_RDONLY)
        self.inode = os.fstat(self.fd).st_ino
        _in_thread(self.fd, _lo_up)

    def preexec(self) -> None:
        _setns(self.fd)

    def on_host(self, work):  # noqa: ANN001, ANN201
        """``work()`` run in the host's network namespace (to look at what listens there)."""
        return _in_thread(self.host_fd, work)

    def inside(self, work):  # noqa: ANN001, ANN201
        return _in_thread(self.fd, work)

    @contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread in the namespace for the block, back on the host network after it."""
        _setns(self.fd)
        try:
            yield
        finally:
            _setns(self.host_fd)

    def close(self) -> None:
        if self.holder.poll() is None:
            os.killpg(self.holder.pid, signal.SIGKILL)
        self.holder.wait(timeout=10)
        for name in ("fd", "host_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    # The head notices a dead node within about 8 s instead of Ray's default 15-30 s; tighter
    # checks declared live nodes dead while the rest of the suite loaded both cores (seen in CI).
    env.update(RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="5000",
               RAY_health_check_failure_threshold="5", RAY_health_check_initial_delay_ms="2000",
               RAY_raylet_start_wait_time_s="180",  # a loaded 2-core machine starts nodes slowly
               # The Ray Client proxy gives a client's own server process 30 s to open its channel, then
               # answers "Initialization failure from server": seen once on a loaded AVX2 2-core machine.
               RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S="180",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # stop at once: nothing to drain in a test
    return env


@dataclass
class LocalCluster:
    root: Path
    port: int
    client_port: int
    netns: NetNamespace
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
        def preexec() -> None:
            self.netns.preexec()  # never the host network
            if cpus:
                os.sched_setaffinity(0, cpus)

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

    def popen(self, args: list[str], **kwargs) -> subprocess.Popen:  # noqa: ANN003
        """A client process (``deploykit bench --fleet`` ...) in the cluster's network namespace."""
        return subprocess.Popen(args, env=kwargs.pop("env", ray_env()), preexec_fn=self.netns.preexec, **kwargs)

    def run(self, args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:  # noqa: ANN003
        with self.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    def add_device(self, label: str, cpus: list[int] | None = None) -> None:
        # Each node of one machine needs its own agent port (Ray's default, 52365, is one per machine).
        self._start(label, ["--address", self.address, "--num-cpus", "1", "--labels", f"device={label}",
                            "--dashboard-agent-listen-port", str(self.netns.inside(_free_port)),
                            "--resources", json.dumps({"deploykit-bench": 1})], cpus)

    def wait_for_devices(self, labels: list[str], timeout_s: float = 120, not_ids: frozenset[str] = frozenset()) -> None:
        """Until a live node has each label; nodes in ``not_ids`` (earlier nodes of a label) do not count."""
        import ray

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            alive = {(n.get("Labels") or {}).get("device") for n in ray.nodes()
                     if n["Alive"] and n["NodeID"] not in not_ids}
            if set(labels) <= alive:
                return
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"ray node {name} exited: {(self.root / f'{name}.log').read_text()[-2000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"device nodes {labels} did not join within {timeout_s} s")

    def wait_until_dead(self, node_id: str, timeout_s: float = 120) -> None:
        """Until the head has declared ``node_id`` dead (a killed node stays "alive" until its health checks fail)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node_id[:12]} still alive {timeout_s} s after it was killed")
            time.sleep(0.5)

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


def new_cluster(netns: NetNamespace) -> LocalCluster:
    """A cluster (not started) whose nodes will run in ``netns``; its ports are free there."""
    # A short root: Ray's unix sockets live under it and their paths are limited to ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="dk-ray-", dir="/tmp"))
    return LocalCluster(root, netns.inside(_free_port), netns.inside(_free_port), netns)
