"""A fleet sweep on a local multi-node Ray cluster: a head and device nodes on this machine.

Starts the cluster the fleet tests use (tests/ray_cluster.py: every node its own `ray start`
process, usage statistics off, no dashboard), runs `deploykit bench --fleet` on it (render the
merged report after it, as below), and stops every node it started, also on failure or Ctrl-C. On one machine the
devices share the hardware: the report says so; what this shows is the mechanism. Because the
nodes share the cores, the sweep runs one device at a time (`--devices LABEL` in turn, one
results file) unless ``--concurrent`` is given; on real hosts a single command measures all.

    python scripts/fleet_local.py --devices host-a,host-b -- \\
        --sweep sweeps/convnext-fc-vs-conv.yaml --results results/fleet.jsonl
    deploykit report latency results/fleet.jsonl --out reports/fleet --force

Everything after ``--`` goes to `deploykit bench` (``--fleet`` is added).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from ray_cluster import new_cluster, ray_env  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="host-a,host-b", help="labels of the device nodes to start")
    parser.add_argument("--concurrent", action="store_true", help="measure all devices at once (they share the cores)")
    parser.add_argument("bench", nargs=argparse.REMAINDER, help="-- then the arguments of `deploykit bench`")
    args = parser.parse_args()
    labels = [x for x in args.devices.split(",") if x]
    bench = [a for a in args.bench if a != "--"]
    cluster = new_cluster()
    try:
        import ray

        cluster.start_head()
        cluster.wait_for_head()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        for label in labels:  # one after the other: nodes starting at once can race for a port
            cluster.add_device(label)
            cluster.wait_for_devices([label])
        ray.shutdown()
        command = [sys.executable, "-m", "deploykit", "bench", *bench, "--fleet", cluster.address]
        for selection in ([None] if args.concurrent else labels):
            run = command + (["--devices", selection] if selection else [])
            print("+", " ".join(run), flush=True)
            code = subprocess.run(run, env=ray_env(), cwd=REPO).returncode
            if code:
                return code
        return 0
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
