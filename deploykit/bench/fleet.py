"""Fleet sweeps: one sweep measured on many device hosts through Ray, into one results file.

The workstation (the Ray driver) exports each model to ONNX once and puts it in Ray's object
store, and the sweep's calibration data (a file or folder: hosts need not have it) once per
sweep; a host writes what it gets into its node cache. A host that does not answer the start-up
probe leaves failure rows naming it; the others measure. On every selected host a Ray task per group of configurations runs the local sweep's
own code (``deploykit.bench.sweep.measure_group``: build on the host, warm-up, interleaved
rounds, statistics). Each task holds the host's ``deploykit-bench`` resource (1 per host), so
one measurement at a time runs there, whoever started it. Rows stream back as the task yields
them; the driver alone appends them to the results file (atomic appends). A host that drops out
leaves a failure row, marked ``dropped_out``, for each configuration of its share not yet
measured; a rerun measures those and whatever else is missing, exactly as a local resume.

Devices are told apart by ``device.id``: a hash of the host's fingerprint and its ``device``
label. Two hosts with identical hardware (or two nodes on one machine) stay two devices, and a
host keeps its id across restarts (Ray's node id changes; the label does not). The hardware
fingerprint's own id is kept as ``device.hardware_id``; each row's ``fleet`` says which Ray node
measured it.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import queue
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.bench import results
from deploykit.bench.spec import Config, SweepSpec, config_id, configurations
from deploykit.errors import DeployError

logger = logging.getLogger(__name__)

RESOURCE = "deploykit-bench"  # custom resource, 1 per device host: one measurement at a time
LABEL = "device"  # node label naming the device (`ray start --labels device=NAME`)
INSTALL_HINT = "fleet sweeps need Ray: pip install 'deploykit[fleet]'"
HOST_SETUP = (f"start each device host with: ray start --address HEAD:6379 --resources '{{\"{RESOURCE}\": 1}}' "
              f"--labels {LABEL}=NAME --disable-usage-stats")
PROBE_TIMEOUT_S = 300.0  # a host's first task starts a Python worker and imports deploykit

# on_event(label, kind, payload): kind is "plan" {total}, "progress" {done, what}, "row" {row}, "lost" {reason}
Event = Callable[[str, str, dict[str, Any]], None]


CONNECT_ATTEMPTS = 3  # Ray Client's transient initialization failure is asked again this often
CONNECT_RETRY_S = 5.0


def _ray() -> Any:
    """Ray, imported with its usage statistics turned off for this process and what it starts."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        import ray
    except ImportError as err:
        raise DeployError(INSTALL_HINT) from err
    return ray


def connect(address: str) -> Any:
    """Join the Ray cluster at ``address`` (``HOST:6379``, or ``ray://HOST:10001`` through Ray Client)."""
    ray = _ray()
    for attempt in range(CONNECT_ATTEMPTS):
        if ray.is_initialized():
            break
        try:
            ray.init(address=address, namespace="deploykit", log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as err:
            # Ray Client's proxy answers "Initialization failure from server" when the server process it
            # starts per client is not up in time (a loaded head): transient, so asked again.
            if "Initialization failure from server" in str(err) and attempt + 1 < CONNECT_ATTEMPTS:
                ray.shutdown()
                time.sleep(CONNECT_RETRY_S * (attempt + 1))
                continue
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DeployError(f"cannot join the Ray cluster at {address}: {first}") from err
    return ray


def disconnect() -> None:
    ray = _ray()
    if ray.is_initialized():
        ray.shutdown()


@dataclass(frozen=True)
class FleetNode:
    """A device host: a live Ray node offering the ``deploykit-bench`` resource."""

    node_id: str
    label: str
    hostname: str
    address: str


def fleet_nodes(devices: Sequence[str] | None = None) -> list[FleetNode]:
    """The device hosts of the connected cluster, those labelled ``devices`` when given."""
    ray = _ray()
    nodes = []
    for info in ray.nodes():
        if not info.get("Alive") or info.get("Resources", {}).get(RESOURCE, 0) < 1:
            continue
        labels = info.get("Labels") or {}
        hostname = info.get("NodeManagerHostname") or info.get("NodeManagerAddress") or "?"
        nodes.append(FleetNode(info["NodeID"], labels.get(LABEL) or hostname, hostname,
                               info.get("NodeManagerAddress", "?")))
    if not nodes:
        raise DeployError(f"the cluster has no device host offering the {RESOURCE!r} resource; {HOST_SETUP}")
    names = [n.label for n in nodes]
    dupes = sorted({x for x in names if names.count(x) > 1})
    if dupes:
        raise DeployError(f"several device hosts are labelled {', '.join(dupes)}: give each its own "
                          f"`--labels {LABEL}=NAME` when starting it")
    if devices:
        unknown = [d for d in devices if d not in names]
        if unknown:
            raise DeployError(f"no device host labelled {', '.join(unknown)}; the fleet has: {', '.join(sorted(names))}")
        nodes = [n for n in nodes if n.label in devices]
    return sorted(nodes, key=lambda n: n.label)


def fleet_device(fingerprint: dict[str, Any], label: str) -> dict[str, Any]:
    """A host's ``device`` record: its fingerprint, with an id that also covers its label."""
    digest = hashlib.sha256(f"{fingerprint['id']}/{label}".encode()).hexdigest()[:12]
    return {**fingerprint, "id": digest, "hardware_id": fingerprint["id"], "label": label}


# --- what runs on a device host -----------------------------------------------------------


def node_facts(label: str) -> dict[str, Any]:
    """On a host: its device record, tool versions and the targets it can run (name -> version)."""
    from deploykit.backends.base import BACKENDS, get_backend
    from deploykit.device import device_fingerprint, tool_versions

    targets: dict[str, str | None] = {}
    for name in sorted(BACKENDS):
        try:
            targets[name] = get_backend(name).version()
        except Exception:  # a broken install is "not available" here, not a failed status
            targets[name] = None
    return {"device": fleet_device(device_fingerprint(), label), "versions": tool_versions(),
            "targets": targets, "hostname": socket.gethostname()}


def _unpack(shipped: dict[str, Any], cache_dir: Path) -> None:
    """Write the ONNX files sent by the workstation where ``prepare.exported_onnx`` finds them."""
    import json

    from deploykit.files import atomic_file

    for stem, item in shipped.items():
        onnx_path, facts_path = cache_dir / f"{stem}.onnx", cache_dir / f"{stem}.json"
        if onnx_path.is_file() and facts_path.is_file():
            continue
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(onnx_path, force=True) as tmp:
            tmp.write_bytes(item["onnx"])
        with atomic_file(facts_path, force=True) as tmp:
            tmp.write_text(json.dumps(item["facts"], indent=2) + "\n")


def _unpack_calib(item: dict[str, Any], cache_dir: Path) -> str:
    """Write the calibration data sent by the workstation into the node cache (once); its path."""
    from deploykit.files import atomic_file

    path = cache_dir / "calib" / f"{item['sha256'][:16]}-{item['name']}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, force=True) as tmp:
            tmp.write_bytes(item["data"])
    return str(path)


def measure_on_node(spec_json: str, ids: list[str], shipped: dict[str, Any], job: dict[str, Any]) -> Iterator[dict]:
    """On a host (a Ray generator task): measure one group with the local sweep's code,
    yielding progress events and rows as they happen."""
    import ray

    from deploykit.bench.sweep import measure_group
    from deploykit.device import device_fingerprint

    spec = SweepSpec.model_validate_json(spec_json)
    cache_dir = job["cache_dir"] or str(Path(tempfile.gettempdir()) / "deploykit-fleet-cache")
    spec = spec.model_copy(update={"cache_dir": cache_dir})
    _unpack(dict(zip(shipped, ray.get(list(shipped.values())))), Path(cache_dir))
    prepare = None
    if job.get("calib") is not None:  # the sweep's calibration data, sent once; ids keep the user's path
        build_spec = spec.model_copy(update={"calib": _unpack_calib(ray.get(job["calib"]), Path(cache_dir))})

        def prepare(config: Config, _spec: SweepSpec) -> Any:
            from deploykit.bench.prepare import check_runnable, prepare as prepare_config

            return prepare_config(config, build_spec, check_runnable(config))
    wanted = set(ids)
    group = [c for c in configurations(spec) if config_id(c, spec) in wanted]
    where = {"label": job["label"], "node_id": ray.get_runtime_context().get_node_id(),
             "hostname": socket.gethostname(), "ray": ray.__version__, "run": job["run"],
             "group_started_at": time.time()}
    events: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def write_row(row: dict[str, Any]) -> None:
        row["fleet"] = {**where, "emitted_at": time.time()}
        events.put({"kind": "row", "row": row})

    def work() -> None:
        try:
            measure_group(spec, group, write_row=write_row, device=fleet_device(device_fingerprint(), job["label"]),
                          command=job["command"], prepare=prepare,
                          on_progress=lambda done, total, what: events.put(
                              {"kind": "progress", "done": done, "what": what}))
        except BaseException as err:  # reported to the driver, which writes failure rows
            events.put({"kind": "error", "reason": f"{type(err).__name__}: {err}"})
        finally:
            events.put(None)

    threading.Thread(target=work, name="deploykit-measure", daemon=True).start()
    while (event := events.get()) is not None:
        yield event


# --- the workstation side -----------------------------------------------------------------


@dataclass
class DeviceTally:
    node: FleetNode
    device: dict[str, Any]
    versions: dict[str, Any] = field(default_factory=dict)  # the host's tool versions, when it answered
    measured: int = 0
    skipped: int = 0
    failed: int = 0
    dropped_out: int = 0
    already_done: int = 0


@dataclass
class FleetOutcome:
    devices: dict[str, DeviceTally] = field(default_factory=dict)  # label -> tally
    rows: list[dict[str, Any]] = field(default_factory=list)


def _on(node: FleetNode) -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node.node_id, soft=False)


def probe_nodes(nodes: Sequence[FleetNode], *, timeout_s: float = PROBE_TIMEOUT_S
                ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``node_facts`` from every host: (label -> facts, label -> why it did not answer)."""
    ray = _ray()
    probe = ray.remote(num_cpus=0, max_retries=0)(node_facts)
    refs = {n.label: probe.options(scheduling_strategy=_on(n)).remote(n.label) for n in nodes}
    facts: dict[str, dict[str, Any]] = {}
    silent: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    for label, ref in refs.items():
        try:
            facts[label] = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            silent[label] = f"it did not answer the start-up probe: {type(err).__name__}: {first}"
    return facts, silent


def describe_nodes(nodes: Sequence[FleetNode], *, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, dict[str, Any]]:
    """``node_facts`` from every host (label -> facts); a host that does not answer is an error."""
    facts, silent = probe_nodes(nodes, timeout_s=timeout_s)
    for label, reason in silent.items():
        raise DeployError(f"device host {label}: {reason} (is deploykit installed there?)")
    return facts


def _unanswered_device(label: str, old: list[dict[str, Any]]) -> dict[str, Any]:
    """The device record of a host that did not answer: from earlier rows of that label, else a stub."""
    for row in reversed(old):
        if row["device"].get("label") == label and not row.get("dropped_out"):
            return row["device"]
    digest = hashlib.sha256(f"unanswered/{label}".encode()).hexdigest()[:12]
    return {"id": digest, "hardware_id": None, "label": label, "cpu": "unknown (the host did not answer)"}


def _done_ids(rows: list[dict[str, Any]], device_id: str, retry_failed: bool) -> set[str]:
    """What a rerun skips on one device: as locally, except rows left by a host that dropped out."""
    return {
        r["config_id"] for r in rows
        if r["device"]["id"] == device_id and not r.get("dropped_out")
        and (not retry_failed or r["status"] == results.STATUS_OK)
    }


def _ship(spec: SweepSpec, configs: Sequence[Config]) -> dict[str, Any]:
    """Export each model once on the workstation and put it in the object store (stem -> ref)."""
    from deploykit.bench.prepare import exported_onnx, onnx_stem

    ray = _ray()
    refs: dict[str, Any] = {}
    tried: set[str] = set()
    for config in configs:
        stem = onnx_stem(config, spec)
        if stem in tried:
            continue
        tried.add(stem)
        try:
            onnx_path, facts = exported_onnx(config, spec)
        except Exception as err:  # the host tries itself and records the failure in its row
            logger.warning("%s: not exported on the workstation (%s); each host will try", config.model.label, err)
            continue
        refs[stem] = ray.put({"onnx": onnx_path.read_bytes(), "facts": facts})
    return refs


def _ship_calib(spec: SweepSpec, configs: Sequence[Config]) -> Any:
    """The sweep's calibration data (a file or folder on the workstation), read once and put in
    the object store once; None when no configuration calibrates or ``calib`` names a recipe."""
    import io
    import tarfile

    if not spec.calib or not any(c.precision == "int8" for c in configs):
        return None
    source = Path(spec.calib).expanduser()
    if source.is_file():
        name, data = source.name, source.read_bytes()
    elif source.is_dir():  # a folder travels as one tar (a calibration source of its own)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(source, arcname=source.name)
        name, data = f"{source.name}.tar", buffer.getvalue()
    else:
        return None  # a recipe name: each host resolves it as a local sweep does
    return _ray().put({"name": name, "data": data, "sha256": hashlib.sha256(data).hexdigest()})


def _dropped_row(spec: SweepSpec, config: Config, tally: DeviceTally, reason: str, run: str) -> dict[str, Any]:
    import datetime as dt

    node = tally.node
    return {
        "schema": results.SCHEMA,
        "status": results.STATUS_FAILED,
        "dropped_out": True,
        "config_id": config_id(config, spec),
        "config": config.describe(),
        "device": tally.device,
        "versions": tally.versions,
        "sweep": {"name": spec.name, "description": spec.description},
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "reason": f"device {node.label} (Ray node {node.node_id[:12]}) dropped out before this was measured: {reason}",
        "fleet": {"label": node.label, "node_id": node.node_id, "hostname": node.hostname, "run": run},
    }


def run_fleet_sweep(
    spec: SweepSpec,
    results_path: Path,
    nodes: Sequence[FleetNode],
    *,
    retry_failed: bool = False,
    command: str | None = None,
    node_cache_dir: str | None = None,
    on_event: Event | None = None,
) -> FleetOutcome:
    """Measure every configuration of ``spec`` on every node in ``nodes`` (connected already),
    skipping what ``results_path`` holds for that device; rows are appended as they arrive."""
    ray = _ray()
    notify = on_event or (lambda label, kind, payload: None)
    results_path = Path(results_path)
    old = results.read_rows(results_path) if results_path.exists() else []
    facts, silent = probe_nodes(nodes)
    outcome = FleetOutcome()
    todo = configurations(spec)
    pending: dict[str, list[Config]] = {}
    run = uuid.uuid4().hex[:12]
    for node in nodes:
        device = facts[node.label]["device"] if node.label in facts else _unanswered_device(node.label, old)
        versions = facts[node.label]["versions"] if node.label in facts else {}
        tally = outcome.devices[node.label] = DeviceTally(node, device, versions)
        done = _done_ids(old, tally.device["id"], retry_failed)
        share = [c for c in todo if config_id(c, spec) not in done]
        tally.already_done = len(todo) - len(share)
        if node.label in silent:  # dropped out before the sweep: its share is failure rows naming it
            for config in share:
                row = _dropped_row(spec, config, tally, silent[node.label], run)
                results.append_row(results_path, row)
                outcome.rows.append(row)
                tally.dropped_out += 1
            notify(node.label, "lost", {"reason": silent[node.label]})
            continue
        pending[node.label] = share
        notify(node.label, "plan", {"total": len(share) * (1 + spec.rounds)})
    nodes = [n for n in nodes if n.label in pending]
    wanted = [c for c in todo if any(c in cs for cs in pending.values())]
    shipped = _ship(spec, wanted)
    calib = _ship_calib(spec, wanted)
    from deploykit.bench.prepare import onnx_stem

    task = ray.remote(num_cpus=0, resources={RESOURCE: 1}, max_retries=0)(measure_on_node)
    spec_json = spec.model_dump_json()
    events: queue.Queue[tuple[str, int, dict[str, Any] | None]] = queue.Queue()
    groups: dict[int, tuple[FleetNode, list[Config]]] = {}
    threads = []
    for node in nodes:
        job = {"label": node.label, "cache_dir": node_cache_dir, "command": command, "run": run, "calib": calib}
        for _, group_iter in itertools.groupby(pending[node.label], key=lambda c: c.group):
            group = list(group_iter)
            refs = {s: shipped[s] for s in {onnx_stem(c, spec) for c in group} if s in shipped}
            stream = task.options(scheduling_strategy=_on(node)).remote(
                spec_json, [config_id(c, spec) for c in group], refs, job)
            index = len(groups)
            groups[index] = (node, group)
            threads.append(threading.Thread(target=_consume, args=(ray, stream, node.label, index, events),
                                            name=f"deploykit-fleet-{node.label}", daemon=True))
    for thread in threads:
        thread.start()
    _collect(spec, results_path, outcome, groups, events, len(threads), notify, run)
    return outcome


def _consume(ray: Any, stream: Any, label: str, index: int, events: queue.Queue) -> None:
    """Read one group task's stream into ``events``; a host lost mid-way becomes a "lost" event."""
    try:
        for ref in stream:
            events.put((label, index, ray.get(ref)))
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        events.put((label, index, {"kind": "error", "reason": f"{type(err).__name__}: {first}"}))
    events.put((label, index, None))


def _collect(spec: SweepSpec, results_path: Path, outcome: FleetOutcome, groups: dict[int, tuple[FleetNode, list[Config]]],
             events: queue.Queue, open_streams: int, notify: Event, run: str) -> None:
    """Append rows and report progress as the streams deliver them; failure rows for the lost."""
    units = 1 + spec.rounds
    base: dict[str, int] = {}  # label -> units of finished groups
    live: dict[int, int] = {}  # group -> units done in it
    reported: dict[int, set[str]] = {i: set() for i in groups}
    while open_streams:
        label, index, event = events.get()
        node, group = groups[index]
        tally = outcome.devices[label]
        if event is None:
            open_streams -= 1
            base[label] = base.get(label, 0) + len(group) * units
            live.pop(index, None)
        elif event["kind"] == "progress":
            live[index] = event["done"]
        elif event["kind"] == "row":
            row = event["row"]
            results.append_row(results_path, row)
            outcome.rows.append(row)
            reported[index].add(row["config_id"])
            status = row["status"]
            if status == results.STATUS_OK:
                tally.measured += 1
            elif status == "skipped":
                tally.skipped += 1
            else:
                tally.failed += 1
            notify(label, "row", {"row": row})
        elif event["kind"] == "error":
            for config in group:
                if config_id(config, spec) not in reported[index]:
                    row = _dropped_row(spec, config, tally, event["reason"], run)
                    results.append_row(results_path, row)
                    outcome.rows.append(row)
                    reported[index].add(row["config_id"])
                    tally.dropped_out += 1
            notify(label, "lost", {"reason": event["reason"]})
        done = base.get(label, 0) + sum(v for i, v in live.items() if groups[i][0].label == label)
        notify(label, "progress", {"done": done, "what": event.get("what", "") if event else ""})
