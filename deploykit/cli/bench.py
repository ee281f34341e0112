"""`deploykit bench` (latency sweeps) and `deploykit report latency` (tables and plots)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click

from deploykit.cli.options import THREADS


def _invocation() -> str:
    """The command line as typed (so reports can say how to regenerate them)."""
    return shlex.join(["deploykit", *sys.argv[1:]])


@click.command()
@click.option("--sweep", "sweep_file", type=click.Path(path_type=Path), help="Sweep YAML (e.g. sweeps/*.yaml); flags below override its keys.")
@click.option("--results", type=click.Path(path_type=Path), required=True, help="JSONL file the rows are appended to; rerunning resumes (with --artifact: a JSON list, replaced).")
@click.option("--artifact", "artifacts", multiple=True, type=click.Path(path_type=Path), help="Time these built artifact directories side by side instead of a sweep; repeatable.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE", help="Target option for every --target, repeatable (as `deploykit build --option`).")
@click.option("--model", "models", multiple=True, help="Model (zoo name, file.py:factory, checkpoint); repeatable.")
@click.option("--form", "forms", multiple=True, type=click.Choice(["deploy", "train"]), help="deploy: fused; train: multi-branch as built. Repeatable.")
@click.option("--target", "targets", multiple=True, help="Target (see `deploykit targets`); repeatable.")
@click.option("--precision", "precisions", multiple=True, help="fp32, fp16, int8, w8; repeatable.")
@click.option("--batch", "batch_sizes", multiple=True, type=click.IntRange(1), help="Batch size; repeatable.")
@click.option("--threads", multiple=True, type=THREADS, help="Thread count; repeatable.")
@click.option("--input-size", "input_sizes", multiple=True, type=click.IntRange(8, 4096), help="Input height/width; repeatable (default: the model's).")
@click.option("--cifar", is_flag=True, default=None, help="Zoo models: the 32x32 CIFAR variant.")
@click.option("--num-classes", type=click.IntRange(1), default=None, help="Zoo models: classifier width.")
@click.option("--calib", default=None, help="INT8 calibration data or recipe (default: synthetic tensors).")
@click.option("--calib-samples", type=click.IntRange(1), default=None, help="INT8 calibration samples (default 128).")
@click.option("--rounds", type=click.IntRange(2), default=None, help="Timed rounds per configuration (default 5).")
@click.option("--min-round-time", type=click.FloatRange(0, min_open=True), default=None, metavar="SECONDS", help="Length of one round (default 0.5).")
@click.option("--warmup-max-time", type=click.FloatRange(0, min_open=True), default=None, metavar="SECONDS", help="Give up waiting for stable timings after this (default 10).")
@click.option("--memory/--no-memory", default=None, help="Also measure peak inference memory in a subprocess.")
@click.option("--cache-dir", default=None, help="Where built artifacts are kept and reused (default build/bench-cache).")
@click.option("--retry-failed", is_flag=True, help="Measure again configurations whose earlier row failed or was skipped.")
@click.option("--name", default=None, help="Sweep name recorded in the rows.")
@click.option("--fleet", default=None, help="Measure on the device hosts of this Ray cluster (HOST:6379 or ray://HOST:10001).")
@click.option("--devices", default=None, help="With --fleet: comma-separated device labels (default: every device host).")
@click.option("--node-cache-dir", default=None, help="With --fleet: where hosts keep built artifacts (default: their temp dir).")
def bench(sweep_file: Path | None, results: Path, artifacts: tuple[Path, ...], options: tuple[str, ...],
          retry_failed: bool, fleet: str | None, devices: str | None, node_cache_dir: str | None,
          **flags: Any) -> None:
    """Measure latency over models x targets x precisions x batch sizes x threads.

    Rows are appended to RESULTS as each group of configurations finishes; a configuration
    that cannot run (unknown model or target, backend not installed) or fails gets a row with
    the reason, and the sweep goes on. Rerunning the same command measures only what is missing.

    \b
    Examples:
      deploykit bench --sweep sweeps/convnext-fc-vs-conv.yaml --results results/convnext.jsonl
      deploykit bench --model repvgg_a0 --form train --form deploy --target onnxruntime \\
          --threads 2 --results results/repvgg.jsonl
      deploykit bench --artifact build/a-fp32 --artifact build/a-int8 --threads 2 --results latency.json
      deploykit bench --sweep sweeps/convnext-fc-vs-conv.yaml --results results/fleet.jsonl \\
          --fleet ray://head:10001 --devices nuc-i7,jetson-orin
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from deploykit.bench.spec import load_sweep, make_sweep
    from deploykit.bench.sweep import run_sweep
    from deploykit.errors import UsageError

    if artifacts:
        _bench_artifacts(list(artifacts), results, flags)
        return
    overrides = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()}
    overrides = {k: v for k, v in overrides.items() if v not in (None, [])}
    if options:
        from deploykit.cli.build import _parse_options

        parsed = _parse_options(options)
        overrides["targets"] = [{"name": t, "options": parsed} for t in overrides.get("targets", ["onnxruntime"])]
    if sweep_file is not None:
        spec = load_sweep(sweep_file, **overrides)
    elif "models" not in overrides:
        raise UsageError("give --sweep FILE or at least one --model")
    else:
        spec = make_sweep(origin="command line", **overrides)
    if fleet is not None:
        from deploykit.cli.fleet import bench_on_fleet

        bench_on_fleet(spec, results, fleet=fleet, devices=devices, retry_failed=retry_failed,
                       node_cache_dir=node_cache_dir, command=_invocation())
        return
    if devices is not None or node_cache_dir is not None:
        raise UsageError("--devices and --node-cache-dir apply to fleet sweeps: add --fleet ADDRESS")
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(spec.name, total=None)

        def on_progress(done: int, total: int, what: str) -> None:
            progress.update(task, completed=done, total=total, description=what[:60])

        outcome = run_sweep(spec, results, retry_failed=retry_failed, command=_invocation(), on_progress=on_progress)
    click.echo(f"{outcome.measured} measured, {outcome.skipped} skipped, {outcome.failed} failed, "
               f"{outcome.already_done} already in {results}")
    for row in outcome.rows:
        if row["status"] != "ok":
            click.echo(f"  {row['status']}: {row['config']['model']} {row['config']['target']} "
                       f"{row['config']['precision']}: {row['reason']}")
    if outcome.measured == 0 and (outcome.skipped or outcome.failed):
        from deploykit.errors import DeployError

        raise DeployError(f"nothing was measured: {outcome.skipped} skipped, {outcome.failed} failed (reasons above)")
    click.echo(f"next: deploykit report latency {results} --out reports/{spec.name}")


def _bench_artifacts(artifacts: list[Path], results: Path, flags: dict[str, Any]) -> None:
    from deploykit.bench.artifacts import DEFAULT_ROUNDS, artifact_latency
    from deploykit.cli.options import DEFAULT_THREADS, write_json
    from deploykit.errors import UsageError

    timing = ("threads", "rounds", "min_round_time")
    grid = sorted(k for k, v in flags.items() if k not in timing and v not in (None, ()))
    if grid:
        raise UsageError(f"--artifact times built artifacts; {', '.join(grid)} apply to sweeps only")
    threads = flags.get("threads") or ()
    if len(threads) > 1:
        raise UsageError("--artifact takes one --threads")
    extra = {"round_seconds": flags["min_round_time"]} if flags.get("min_round_time") else {}
    rows = artifact_latency(artifacts, threads=threads[0] if threads else DEFAULT_THREADS,
                            rounds=flags.get("rounds") or DEFAULT_ROUNDS, **extra)
    write_json(results, rows, force=True)
    for row in rows:
        click.echo(f"{row['artifact']}: {row['median_ms']:.3f} ms (median of {len(row['round_medians_ms'])} rounds)")


@click.group()
def report() -> None:
    """Render result rows into reports.

    \b
    Example:
      deploykit report latency results/convnext.jsonl --out reports/convnext-fc-vs-conv
    """


@report.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Path stem: writes OUT.md, OUT.csv, OUT.html and plots in OUT/.")
@click.option("--title", default=None, help="Report title (default: from the sweep names).")
@click.option("--no-plots", is_flag=True, help="Tables only.")
@click.option("--force", is_flag=True, help="Replace an existing report.")
def latency(results: tuple[Path, ...], out: Path, title: str | None, no_plots: bool, force: bool) -> None:
    """Merge RESULTS files (from any number of devices) into latency tables and plots.

    Rows are merged (the latest per device and configuration), marked when unstable or
    made with other tool versions, and compared as the sweeps declared, with verdicts.

    \b
    Example:
      deploykit report latency results/convnext.jsonl results/convnext-gpu.jsonl \\
          --out reports/convnext-fc-vs-conv
    """
    from deploykit.report.write import write_latency_report

    written = write_latency_report(list(results), out, title=title, force=force, command=_invocation(),
                                   plots=not no_plots)
    click.echo(f"{written.rows} rows from {written.devices} device(s): {written.markdown}, {written.csv}, "
               f"{written.html}" + (f", {len(written.plots)} plots" if written.plots else ""))
