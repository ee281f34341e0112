"""`deploykit doctor`: what this machine can build and run, each missing piece with its fix."""
from __future__ import annotations

import json

import click


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.option("--require", "required", multiple=True, metavar="TARGET",
              help="Exit 1 with the one-line error unless TARGET (tensorrt, or a CPU target) is usable.")
def doctor(as_json: bool, required: tuple[str, ...]) -> None:
    """Check the GPU, driver, CUDA, compute capability and TensorRT, and every CPU runtime.

    TensorRT checks are the ones `deploykit build --target tensorrt` runs before building;
    for machines without TensorRT, `--emit-only` writes everything needed to build elsewhere.

    \b
    Examples:
      deploykit doctor
      deploykit doctor --require tensorrt
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from deploykit.backends.base import BACKENDS, get_backend
    from deploykit.errors import DeployError, UsageError
    from deploykit.preflight import checks_as_dicts, evaluate, gather_facts, require_tensorrt

    facts = gather_facts()
    checks = checks_as_dicts(evaluate(facts))
    try:
        require_tensorrt(facts)
        verdict = "target tensorrt: ready to build and run engines"
    except DeployError as err:
        verdict = str(err)
    runtimes = []
    for name in sorted(BACKENDS):
        backend = get_backend(name)
        version = backend.version()
        runtimes.append({"name": name, "device": backend.device, "status": "ok" if version else "fail",
                         "detail": version or "not installed", "fix": "" if version else backend.missing_reason()})
    if as_json:
        click.echo(json.dumps({"tensorrt": checks, "tensorrt_verdict": verdict, "environment": facts.environment(),
                               "runtimes": runtimes}, indent=2))
    else:
        colour = {"ok": "green", "warn": "yellow", "fail": "red", "skip": "dim"}
        table = Table("check", "status", "found", "fix", title="TensorRT target")
        for row in checks:
            table.add_row(row["name"], f"[{colour[row['status']]}]{row['status']}", escape(row["detail"] or "-"),
                          escape(row["fix"]))
        console = Console()
        console.print(table)
        console.print(escape(verdict))
        for device in ("cpu", "gpu"):
            runtime_table = Table("target", "status", "found", "fix", title=f"{device.upper()} runtimes")
            for row in runtimes:
                if row["device"] == device:
                    runtime_table.add_row(row["name"], f"[{colour[row['status']]}]{row['status']}",
                                          escape(row["detail"]), escape(row["fix"]))
            console.print(runtime_table)
    for target in required:
        if target not in BACKENDS:
            raise UsageError(f"--require {target}: unknown target; choose from {', '.join(sorted(BACKENDS))}")
        get_backend(target).require()
