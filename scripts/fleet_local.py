"""A fleet sweep on a local multi-node Ray cluster: a head and device nodes on this machine.

Starts the cluster the fleet tests use (tests/ray_cluster.py: every node its own `ray start`
process, usage statistics off, no dashboard), runs `deploykit bench --fleet` on it (render the
merged report after it, as below), and stops every node it started, also on failure or Ctrl-C. On one machine the
devices share the hardware: the report says so; what this shows is the mechanism. Because the
nodes share the cores, the sweep runs one device at a time (`--devices LABEL` in turn, one
results file) unless ``--concurrent`` is given; on real hosts a single command measures all.
The nodes, this script's Ray driver and the bench command run in a private network namespace
with only loopback (``unshare --net``: run as root); nothing listens on the host's interfaces.

    python scripts/fleet_local.py --devices host-a,host-b -- \\
        --sweep sweeps/convnext-fc-vs-conv.yaml --results results/fleet.jsonl
    deploykit report latency results/fleet.jsonl --out reports/fleet --force

Everything after ``--`` goes to `deploykit bench` (``--fleet`` is added).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from ray_cluster import NamespaceUnavailable, NetNamespace, new_cluster  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="host-a,host-b", help="labels of the device nodes to start")
    parser.add_argument("--concurrent", action="store_true", help="measure all devices at once (they share the cores)")
    parser.add_argument("bench", nargs=argparse.REMAINDER, help="-- then the arguments of `deploykit bench`")
    args = parser.parse_args()
    labels = [x for x in args.devices.split(",") if x]
    bench = [a for a in args.bench if a != "--"]
    try:
        netns = NetNamespace()
    except NamespaceUnavailable as err:
        print(f"error: {err}; the local cluster runs only on a private loopback network", file=sys.stderr)
        return 1
    cluster = new_cluster(netns)
    try:
        import ray

        cluster.start_head()
        cluster.wait_for_head()
        with netns.entered():  # this driver talks to the cluster from inside the namespace
            ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
            for label in labels:  # one after the other: nodes starting at once can race for a port
                cluster.add_device(label)
                cluster.wait_for_devices([label])
            ray.shutdown()
        command = [sys.executable, "-m", "deploykit", "bench", *bench, "--fleet", cluster.address]
        for selection in ([None] if args.concurrent else labels):
            run = command + (["--devices", selection] if selection else [])
            print("+", " ".join(run), flush=True)
            with cluster.popen(run, cwd=REPO) as proc:  # in the namespace: preexec setns
                code = proc.wait()
            if code:
                return code
        return 0
    finally:
        cluster.stop()
        netns.close()


if __name__ == "__main__":
    sys.exit(main())
