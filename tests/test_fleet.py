"""Fleet sweeps on a real Ray cluster of this machine: a head and two device nodes, each its own
process (tests/ray_cluster.py). One sweep (a tiny model, two targets, two batch sizes, two
rounds) runs while the second device is killed, then again after it comes back. The cluster
and every process that talks to it (this one included) live in a private network namespace
with only loopback; where it cannot be made the cluster tests skip."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from deploykit.bench import results
from deploykit.bench.spec import configurations, config_id, make_sweep
from deploykit.errors import DeployError

from deploykit.bench import fleet
from ray_cluster import REPO, NamespaceUnavailable, NetNamespace, listening_ports, new_cluster
from test_bench_sweep import FAST, TINY_SOURCE

HAVE_RAY = importlib.util.find_spec("ray") is not None
# One cluster, on one xdist worker (`--dist loadgroup`): spread over two, each worker would start
# its own cluster and a test could run where the sweep that killed beta never ran.
pytestmark = pytest.mark.xdist_group("ray-cluster")

DEVICES = ["alpha", "beta"]
LOOPBACK_OR_ANY = {"127.0.0.1", "::ffff:127.0.0.1", "::1", "0.0.0.0", "::"}


@pytest.fixture(scope="module")
def netns():
    """This thread (the Ray driver), the nodes and the client processes: in one private namespace."""
    if not HAVE_RAY:
        pytest.skip("fleet sweeps need Ray: pip install 'deploykit[fleet]'")
    try:
        ns = NetNamespace()
    except NamespaceUnavailable as err:
        pytest.skip(f"{err}: the Ray cluster runs only on a private loopback network")
    try:
        with ns.entered():
            yield ns
    finally:
        ns.close()


@pytest.fixture(scope="module")
def cluster(netns):
    c = new_cluster(netns)
    try:
        c.start_head()
        c.wait_for_head()
        fleet.connect(c.address)
        for label in DEVICES:  # one after the other: nodes starting at once can race for a port
            c.add_device(label)
            c.wait_for_devices([label])
        yield c
    finally:
        fleet.disconnect()
        c.stop()


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("fleet")
    (folder / "tiny.py").write_text(TINY_SOURCE)
    return make_sweep(name="fleet-test", models=[{"name": f"{folder / 'tiny.py'}:tiny", "label": "tiny"}],
                      targets=["onnxruntime", "torch"], batch_sizes=[1, 2], cache_dir=str(folder / "cache"), **FAST)


@pytest.fixture(scope="module")
def first_run(cluster, spec, tmp_path_factory):
    """The sweep on both devices; beta is killed as soon as its first row arrives."""
    path = tmp_path_factory.mktemp("results") / "fleet.jsonl"
    killed = []

    def on_event(label: str, kind: str, payload: dict) -> None:
        if label == "beta" and kind == "row" and not killed:
            killed.append(payload["row"]["config_id"])
            cluster.kill("beta")

    nodes = fleet.fleet_nodes()
    outcome = fleet.run_fleet_sweep(spec, path, nodes, node_cache_dir=str(cluster.root / "node-cache"),
                                    on_event=on_event)
    return path, outcome, {n.label: n for n in nodes}


def _by_label(rows: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["device"]["label"], []).append(row)
    return grouped


def test_every_device_has_a_row_for_every_configuration(first_run, spec):
    path, outcome, _ = first_run
    ids = {config_id(c, spec) for c in configurations(spec)}
    rows = _by_label(results.read_rows(path))
    assert set(rows) == set(DEVICES)
    for label in DEVICES:
        assert sorted(r["config_id"] for r in rows[label]) == sorted(ids), label
    assert all(r["status"] == "ok" for r in rows["alpha"]), [r.get("reason") for r in rows["alpha"]]
    assert outcome.devices["alpha"].measured == len(ids)


def test_rows_carry_the_node_that_measured_them(first_run):
    path, _, nodes = first_run
    from deploykit.device import device_fingerprint

    here = device_fingerprint()  # one machine: every node has this hardware
    rows = results.read_rows(path)
    for row in (r for r in rows if r["status"] == "ok"):
        label = row["device"]["label"]
        assert row["fleet"]["node_id"] == nodes[label].node_id  # where Ray really ran it
        assert row["device"]["hardware_id"] == here["id"] and row["device"]["cpu"] == here["cpu"]
        assert row["device"]["id"] == fleet.fleet_device(here, label)["id"]
    assert len({r["device"]["id"] for r in rows}) == 2  # same hardware, two devices


def test_one_measurement_at_a_time_per_device(first_run):
    path, _, _ = first_run
    for label, rows in _by_label(results.read_rows(path)).items():
        windows = {}
        for row in rows:
            if "group_started_at" in row["fleet"]:
                start, end = windows.get(row["group_run"], (row["fleet"]["group_started_at"], 0.0))
                windows[row["group_run"]] = (start, max(end, row["fleet"]["emitted_at"]))
        spans = sorted(windows.values())
        assert spans, label
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), (label, spans)


def test_a_killed_device_leaves_failure_rows_naming_it(first_run):
    path, outcome, nodes = first_run
    beta = _by_label(results.read_rows(path))["beta"]
    dropped = [r for r in beta if r.get("dropped_out")]
    assert dropped and outcome.devices["beta"].dropped_out == len(dropped)
    assert all(r["status"] == "failed" and "device beta" in r["reason"] and nodes["beta"].node_id[:12] in r["reason"]
               for r in dropped)
    assert any(r["status"] == "ok" for r in beta)  # what it measured before it died is kept


def test_a_host_that_does_not_answer_the_probe_is_dropped_not_fatal(first_run, spec, tmp_path):
    path, _, nodes = first_run
    copy = tmp_path / "fleet.jsonl"
    copy.write_bytes(path.read_bytes())
    before = results.read_rows(copy)
    # beta's first node died in first_run: the probe cannot reach it; alpha has measured everything
    outcome = fleet.run_fleet_sweep(spec, copy, [nodes["alpha"], nodes["beta"]],
                                    node_cache_dir=str(Path(fleet.__file__).parent / "no-such-cache"))
    assert outcome.devices["alpha"].measured == 0 and outcome.devices["alpha"].already_done == 4
    rows = results.read_rows(copy)[len(before):]
    missing = {r["config_id"] for r in before if r.get("dropped_out")}
    assert {r["config_id"] for r in rows} == missing and outcome.devices["beta"].dropped_out == len(missing)
    assert all(r["dropped_out"] and r["status"] == "failed" and "device beta" in r["reason"]
               and "did not answer the start-up probe" in r["reason"] for r in rows), rows[0]["reason"]
    assert {r["device"]["id"] for r in rows} == {r["device"]["id"] for r in before if r["device"]["label"] == "beta"}


def test_calibration_data_travels_from_the_workstation(cluster, tmp_path_factory):
    """An int8 sweep calibrated from a file only the workstation reads: it is sent once, and the
    host builds from its own copy (the file is deleted as soon as the host starts; its build
    records the node cache's copy, never the workstation's path)."""
    import numpy as np

    folder = tmp_path_factory.mktemp("workstation-only")
    (folder / "tiny.py").write_text(TINY_SOURCE)
    calib = folder / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((24, 3, 16, 16)).astype(np.float32))
    sent = calib.read_bytes()
    node_cache = cluster.root / "calib-node-cache"
    spec = make_sweep(name="fleet-calib", models=[{"name": f"{folder / 'tiny.py'}:tiny", "label": "tiny"}],
                      targets=["onnxruntime"], precisions=["int8"], calib=str(calib), calib_samples=16,
                      cache_dir=str(folder / "cache"), **FAST)

    def on_event(label: str, kind: str, payload: dict) -> None:
        if kind in ("progress", "row") and calib.exists():  # sent by now: the host must not need it
            calib.unlink()

    outcome = fleet.run_fleet_sweep(spec, folder / "r.jsonl", fleet.fleet_nodes(["alpha"]),
                                    node_cache_dir=str(node_cache), on_event=on_event)
    assert not calib.exists()
    [row] = outcome.rows
    assert row["status"] == "ok", row.get("reason")
    assert row["config_id"] == config_id(configurations(spec)[0], spec)  # the id names the user's path
    [copy] = (node_cache / "calib").iterdir()
    assert copy.read_bytes() == sent
    build_json = "\n".join(p.read_text() for p in node_cache.rglob("build.json"))
    assert str(copy) in build_json and str(calib) not in build_json


def test_rerun_measures_only_what_is_missing(first_run, cluster, spec):
    path, first, nodes = first_run
    before = results.read_rows(path)
    missing = {r["config_id"] for r in before if r.get("dropped_out")}
    # Until its health checks fail the head still lists the killed node as alive: wait for that,
    # then for the new node (not the old one under the same label) before sweeping again.
    cluster.wait_until_dead(nodes["beta"].node_id)
    cluster.add_device("beta")  # the host comes back: a new Ray node, the same device
    cluster.wait_for_devices(["beta"], not_ids=frozenset({nodes["beta"].node_id}))
    again = fleet.run_fleet_sweep(spec, path, fleet.fleet_nodes(), node_cache_dir=str(cluster.root / "node-cache"))
    assert again.devices["alpha"].measured == 0 and again.devices["alpha"].already_done == 4
    assert {r["config_id"] for r in again.rows} == missing
    assert all(r["device"]["label"] == "beta" and r["status"] == "ok" for r in again.rows)
    ok = Counter((r["device"]["id"], r["config_id"]) for r in results.read_rows(path) if r["status"] == "ok")
    assert len(ok) == 8 and set(ok.values()) == {1}  # each device x configuration measured once


def test_merged_report_groups_rows_by_device(first_run, tmp_path):
    path, _, _ = first_run
    from deploykit.report.write import write_latency_report

    written = write_latency_report([path], tmp_path / "fleet", plots=False)
    text = written.markdown.read_text()
    assert written.devices == 2
    assert "alpha: " in text and "beta: " in text
    assert "have the same hardware fingerprint" in text  # one machine here: the report says so


def _group_pids(leaders: list[int]) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) in leaders:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_the_cluster_talks_only_on_loopback_in_its_own_namespace(first_run, cluster, netns):
    import ray

    pids = _group_pids([p.pid for p in cluster.processes.values()])  # nodes, raylets, agents, workers
    assert len(pids) > 2 * len(cluster.processes)
    assert {os.stat(f"/proc/{pid}/ns/net").st_ino for pid in pids} == {netns.inode}
    assert os.stat("/proc/thread-self/ns/net").st_ino == netns.inode  # the driver too
    assert netns.inside(lambda: [line.split(":")[0].strip() for line in Path("/proc/thread-self/net/dev")
                                 .read_text().splitlines()[2:]]) == ["lo"]
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    inside = netns.inside(listening_ports)
    assert cluster.port in {port for _, port in inside}
    assert {address for address, _ in inside} <= LOOPBACK_OR_ANY  # "any" in a namespace with only lo
    assert cluster.port not in {port for _, port in netns.on_host(listening_ports)}


def test_devices_selects_by_label_and_unknown_labels_are_named(cluster):
    # alpha: the one device no test kills (beta may be down or back, depending on what ran before)
    assert [n.label for n in fleet.fleet_nodes(["alpha"])] == ["alpha"]
    with pytest.raises(DeployError, match="no device host labelled gamma; the fleet has: alpha"):
        fleet.fleet_nodes(["gamma"])


def test_fleet_status_through_ray_client(cluster):
    out = cluster.run([sys.executable, "-m", "deploykit", "fleet", "status", "--fleet", cluster.client_address,
                       "--devices", "alpha", "--json"], cwd=REPO, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    facts = json.loads(out.stdout)
    assert list(facts) == ["alpha"]
    assert facts["alpha"]["device"]["label"] == "alpha" and facts["alpha"]["targets"]["onnxruntime"]
    assert facts["alpha"]["versions"]["deploykit"]


def test_without_ray_fleet_says_how_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(DeployError, match=r"pip install 'deploykit\[fleet\]'"):
        fleet.connect("127.0.0.1:1")


def test_devices_without_fleet_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from deploykit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--model", "no_such_model", "--results", str(tmp_path / "r.jsonl"), "--devices", "alpha"])
    assert exit_info.value.code == 2
    assert "--devices and --node-cache-dir apply to fleet sweeps: add --fleet ADDRESS" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()
