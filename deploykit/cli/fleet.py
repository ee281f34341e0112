"""`deploykit fleet status` and the `deploykit bench --fleet` path: progress per device, summary."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from deploykit.errors import UsageError

FLEET_HELP = "Ray cluster to measure on: HOST:6379, or ray://HOST:10001 (Ray Client)."
DEVICES_HELP = "Comma-separated device labels (`ray start --labels device=NAME`); default: every device host."


def parse_devices(devices: str | None) -> list[str] | None:
    if devices is None:
        return None
    labels = [d.strip() for d in devices.split(",") if d.strip()]
    if not labels:
        raise UsageError("--devices: give at least one device label")
    return labels


def bench_on_fleet(spec: Any, results: Path, *, fleet: str, devices: str | None, retry_failed: bool,
                   node_cache_dir: str | None, command: str) -> None:
    """Run ``spec`` on the fleet with a progress bar per device, then print the summary."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from deploykit.bench.fleet import connect, disconnect, fleet_nodes, run_fleet_sweep

    labels = parse_devices(devices)
    connect(fleet)
    try:
        nodes = fleet_nodes(labels)
        console = Console(stderr=True)
        columns = (TextColumn("{task.fields[device]:>12}"), TextColumn("{task.description}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            bars = {n.label: progress.add_task("probing", total=None, device=n.label) for n in nodes}

            def on_event(label: str, kind: str, payload: dict[str, Any]) -> None:
                bar = bars[label]
                if kind == "plan":
                    progress.update(bar, total=payload["total"], description="queued")
                elif kind == "progress":
                    progress.update(bar, completed=payload["done"],
                                    **({"description": payload["what"][:48]} if payload["what"] else {}))
                elif kind == "lost":
                    progress.update(bar, description=f"[red]dropped out: {payload['reason'][:40]}")

            outcome = run_fleet_sweep(spec, results, nodes, retry_failed=retry_failed, command=command,
                                      node_cache_dir=node_cache_dir, on_event=on_event)
    finally:
        disconnect()
    _summary(outcome, results)
    click.echo(f"next: deploykit report latency {results} --out reports/{spec.name}")


def _summary(outcome: Any, results: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fleet sweep -> {results}")
    for name in ("device", "host", "device id", "measured", "skipped", "failed", "dropped out", "already done"):
        table.add_column(name, justify="left" if name in ("device", "host", "device id") else "right")
    for label, t in outcome.devices.items():
        table.add_row(label, t.node.hostname, t.device["id"], str(t.measured), str(t.skipped), str(t.failed),
                      str(t.dropped_out), str(t.already_done))
    Console().print(table)
    for row in outcome.rows:
        if row["status"] != "ok":
            click.echo(f"  {row['fleet']['label']}: {row['status']}: {row['config']['model']} {row['config']['target']} "
                       f"{row['config']['precision']} b{row['config']['batch']}: {row['reason']}")


@click.group()
def fleet() -> None:
    """Device hosts of a Ray cluster, for `deploykit bench --fleet`.

    \b
    Example:
      deploykit fleet status --fleet ray://head:10001
    """


@fleet.command()
@click.option("--fleet", "address", required=True, help=FLEET_HELP)
@click.option("--devices", default=None, help=DEVICES_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON instead of a table.")
def status(address: str, devices: str | None, as_json: bool) -> None:
    """The devices a fleet sweep would use: fingerprint, runtimes and versions of each host."""
    import json

    from rich.console import Console
    from rich.table import Table

    from deploykit.bench.fleet import connect, describe_nodes, disconnect, fleet_nodes
    from deploykit.device import describe_cpu

    labels = parse_devices(devices)
    connect(address)
    try:
        nodes = fleet_nodes(labels)
        facts = describe_nodes(nodes)
    finally:
        disconnect()
    if as_json:
        click.echo(json.dumps({n.label: {"node_id": n.node_id, **facts[n.label]} for n in nodes}, indent=2,
                              sort_keys=True))
        return
    table = Table(title=f"{len(nodes)} device host(s) at {address}")
    for name in ("device", "host", "Ray node", "CPU / GPU", "cores", "device id", "deploykit", "targets"):
        table.add_column(name)
    for node in nodes:
        f = facts[node.label]
        d = f["device"]
        gpu = ", ".join(g["name"] for g in d.get("gpus") or [])
        targets = ", ".join(f"{name} {version}" for name, version in f["targets"].items() if version)
        table.add_row(node.label, node.hostname, node.node_id[:12], describe_cpu(d) + (f" / {gpu}" if gpu else ""),
                      str(d["usable_cores"]), d["id"], f["versions"].get("deploykit", "?"), targets or "none")
    Console().print(table)
