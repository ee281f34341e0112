"""`deploykit build`, `deploykit eval`, `deploykit targets`: thin wrappers over the library."""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from deploykit.cli.options import ACCEPT_PARTIAL_HELP, DEFAULT_THREADS, DEFAULT_VERIFY_SAMPLES, THREADS, WEIGHTS_HELP

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "w8")


def _parse_options(pairs: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--option")
        options[key.strip()] = value.strip()
    return options


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


@contextlib.contextmanager
def _logs_to(console: Any) -> Iterator[None]:
    """Route deploykit's log records through ``console`` so they print above the live progress."""
    from rich.logging import RichHandler

    logger = logging.getLogger("deploykit")
    handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    handler.setLevel(logging.getLogger().getEffectiveLevel())
    logger.addHandler(handler)
    previous = logger.propagate
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = previous


@click.command("build")
@click.argument("model")
@click.option("--target", "-t", required=True,
              help="A target or a profile: see `deploykit targets`; auto: what `deploykit advise` picks.")
@click.option("--precision", "-p", type=click.Choice(PRECISIONS), default=None,
              help="Default: the profile's, else fp32.")
@click.option("--calib", default=None, metavar="RECIPE|PATH",
              help="Calibration recipe (deploykit/data/calib/NAME.yaml or ./calib/NAME.yaml) or data: image folder, .tar.gz tree, .npy/.npz.")
@click.option("--calib-recipe", default=None, metavar="NAME", help="Preprocessing recipe for --calib PATH.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=None, help="Calibration sample count.")
@click.option("--verify-samples", type=click.IntRange(min=1), default=DEFAULT_VERIFY_SAMPLES, show_default=True,
              help="Held-out inputs the artifact is verified on.")
@click.option("--seed", type=int, default=None, help="Seed of the calibration subset (default: the recipe's).")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Artifact directory (default build/MODEL-TARGET-PRECISION).")
@click.option("--threads", type=THREADS, default=None, help=f"Runtime threads (default: the profile's, else {DEFAULT_THREADS}).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Target option, repeatable; valid keys: `deploykit targets --json`.")
@click.option("--max-drop", type=float, default=None, help="int8: largest top-1 drop in points (1.0 = one point): openvino uses NNCF accuracy control; "
                   "onnxruntime/mnn try per-channel, equalization, bias correction, then float layers.")
@click.option("--int8-fix", type=click.Choice(["zero-dead", "repvgg"]), default=None,
              help="int8, no budget needed: zero-dead = zero the weights on always-zero input channels (exact); "
                   "repvgg = zero-dead + per-channel + cross-layer equalization + bias correction.")
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help="Classifier size (zoo, timm, torchvision).")
@click.option("--weights", default=None, metavar="FILE|pretrained", help=WEIGHTS_HELP)
@click.option("--accept-partial", is_flag=True, help=ACCEPT_PARTIAL_HELP)
@click.option("--no-fuse", is_flag=True,
              help=".onnx MODEL: build the graph as given (default: fold Conv+BN and merge summed parallel branches "
                   "first, certified on ONNX Runtime).")
@click.option("--cifar", is_flag=True, default=None, help="Zoo model in its CIFAR (32x32) form.")
@click.option("--input-size", type=click.IntRange(8, 4096), default=None,
              help="Input height/width of a zoo MODEL (default: the model's).")
@click.option("--emit-only", is_flag=True,
              help="tensorrt: write the ONNX, calibration summary and trtexec command; build no engine here.")
@click.option("--advice", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="--target auto: pick from this advice.json of an earlier `deploykit advise` (default: run advise).")
@click.option("--force", is_flag=True, help="Replace an existing artifact directory.")
def build(model: str, target: str, precision: str | None, calib: str | None, calib_recipe: str | None,
          calib_samples: int | None, verify_samples: int, seed: int | None, out: Path | None, threads: int | None,
          options: tuple[str, ...], max_drop: float | None, int8_fix: str | None, num_classes: int | None, cifar: bool | None,
          input_size: int | None, weights: str | None, accept_partial: bool, no_fuse: bool, emit_only: bool,
          advice: Path | None, force: bool) -> None:
    """Build a verified artifact for TARGET from MODEL (zoo name, timm:NAME, torchvision:NAME, file.py:factory,
    checkpoint or .onnx).

    Fuses, exports, converts or quantizes, then verifies the artifact against the model on
    held-out inputs and writes it with build.json. INT8 without --calib calibrates on seeded
    random tensors and warns: accuracy needs real data.

    \b
    Example:
      deploykit build repvgg_a0 --cifar --num-classes 10 --target openvino --precision int8 \\
          --calib ../shared/data/cifar10-jpeg.tar.gz --calib-samples 512
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from deploykit.build import BuildRequest, build as run_build

    parsed = _parse_options(options)
    if target == "auto":
        target, precision, chosen = _auto_target(model, precision, calib, calib_samples, max_drop, threads,
                                                 num_classes, cifar, advice)
        parsed = {**chosen, **parsed}  # the chosen variant's options; the user's --option on top
        max_drop = None  # the budget was advise's: no int8 repair loop
    if emit_only:
        parsed["emit_only"] = "true"
    request = BuildRequest(
        model=model, target=target, precision=precision, calib=calib, calib_recipe=calib_recipe,
        calib_samples=calib_samples, out=out, threads=threads, options=parsed, force=force,
        num_classes=num_classes, cifar=cifar, input_size=input_size, verify_samples=verify_samples, seed=seed,
        max_drop=max_drop, weights=weights, accept_partial=accept_partial, int8_fix=int8_fix, fuse=not no_fuse,
    )
    console = _stderr_console()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress, _logs_to(console):
        task = None

        def step(text: str) -> None:
            nonlocal task
            if task is not None:
                progress.update(task, completed=1, total=1)
            task = progress.add_task(text, total=None)

        result = run_build(request, progress=step)
        if task is not None:
            progress.update(task, completed=1, total=1)
    _print_build(result.meta, result.path)
    backend_facts = result.record.backend
    if backend_facts.get("emit_only"):
        click.echo(f"no engine built here; on a machine with TensorRT run: {backend_facts.get('trtexec')}")
        click.echo(f"(or: cd {result.path} && bash build_engine.sh)")


def _auto_target(model: str, precision: str | None, calib: str | None, calib_samples: int | None,
                 max_drop: float | None, threads: int | None, num_classes: int | None, cifar: bool | None,
                 advice: Path | None) -> tuple[str, str, dict[str, Any]]:
    """--target auto: (target, precision, options) of the fastest artifact within --max-drop (default 1
    point), from advise or its advice.json."""
    from deploykit.advise import AdviseRequest, choose_from_file
    from deploykit.cli.advise import run_advice
    from deploykit.report.advice import as_flags

    budget = 1.0 if max_drop is None else max_drop
    if advice is not None:
        target, precision, options = choose_from_file(advice, model=model, max_drop=budget, precision=precision)
    else:
        request = AdviseRequest(model=model, calib=calib, precisions=(precision,) if precision else (),
                                max_drop=budget, num_classes=num_classes, cifar=cifar, threads=threads or 2,
                                calib_samples=calib_samples)
        chosen = run_advice(request, None).chosen
        target, precision, options = chosen.target, chosen.precision, chosen.options
    given = f" {as_flags(options)}" if options else ""
    click.echo(f"--target auto: building {target} {precision}{given} (fastest within {budget:g} points)")
    return target, precision, options


def _print_build(meta: dict[str, Any], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    v = meta["verification"]
    table = Table(title=f"{path}  ({meta['target']} {meta['precision']}, {meta['build_seconds']:.1f} s)",
                  show_header=False, title_justify="left")
    table.add_row("files", ", ".join(f"{name} ({(path / name).stat().st_size / 1e6:.2f} MB)" for name in meta["files"]))
    calib = meta["calibration"]
    if calib:
        table.add_row("calibration", f"{calib['count']} samples from {calib['source']} (seed {calib['seed']})")
    table.add_row("verified on", f"{v['samples']} {v['inputs']} vs {v['reference']}")
    table.add_row("cosine (min / mean)", f"{v['cosine_min']:.6f} / {v['cosine_mean']:.6f}")
    table.add_row("max abs error", f"{v['max_abs_error']:.3g} (relative {v['max_rel_error']:.3g})")
    table.add_row("top-1 agreement", f"{v['top1_agreement']:.4f}")
    for label, text in arithmetic_rows(meta.get("backend") or {}):
        table.add_row(label, text)
    Console().print(table)


def arithmetic_rows(facts: dict[str, Any]) -> list[tuple[str, str]]:
    """The arithmetic the runtime executes, per op kind, and the CPU features that decided it."""
    rows = []
    plan = facts.get("arithmetic")
    if plan:
        native = "native" if plan["native"] else "not native"
        features = ", ".join(plan["features"]) or "-"
        rows.append(("arithmetic", f"{plan['executes']} ({native}; CPU features: {features})"
                     + (f"; {plan['note']}" if plan.get("note") else "")))
    executed = facts.get("executed_precision")
    if executed:
        parts = [f"{kind} {'/'.join(f'{p}x{n}' for p, n in sorted(by.items()))}" for kind, by in sorted(executed.items())]
        rows.append(("executed precision", ", ".join(parts)))
    return rows


@click.command("eval")
@click.argument("subject", metavar="ARTIFACT_OR_MODEL")
@click.option("--data", required=True, help="Labeled images: folder tree (one folder per class) or .tar.gz.")
@click.option("--split", default="test", show_default=True, help="Subfolder of --data to use when present.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate a seeded subset of N images.")
@click.option("--threads", type=THREADS, default=DEFAULT_THREADS, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--calib-recipe", default=None, metavar="NAME",
              help="Preprocessing recipe (default: the artifact's stored one, else the model's default).")
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help="For a zoo MODEL.")
@click.option("--cifar", is_flag=True, default=None, help="For a zoo MODEL: its CIFAR form.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(subject: str, data: str, split: str, limit: int | None, threads: int, batch_size: int,
             calib_recipe: str | None, num_classes: int | None, cifar: bool | None, as_json: bool) -> None:
    """Top-1 accuracy of an artifact (or a model, or an .onnx file) on a labeled image folder.

    An artifact is fed with the preprocessing stored in its build.json.

    \b
    Example:
      deploykit eval build/repvgg_a0-openvino-int8 --data ../shared/data/cifar10-jpeg.tar.gz --limit 2000
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from deploykit.evaluate import evaluate as run_eval
    from deploykit.evaluate import open_evaluable

    console = _stderr_console()
    evaluable = open_evaluable(subject, threads=threads, num_classes=num_classes, cifar=cifar, calib_recipe=calib_recipe)
    columns = (TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("eval", total=None)
        result = run_eval(evaluable, data, split=split, limit=limit, batch_size=batch_size,
                          progress=lambda done, total: progress.update(task, completed=done, total=total))
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"{result.subject}: top-1 {result.top1:.4f} ({result.correct}/{result.count}) on {result.data}")


@click.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def targets(as_json: bool) -> None:
    """Every target: available here?, version, precisions; then the profiles in targets/.

    \b
    Example:
      deploykit targets
    """
    from rich.console import Console
    from rich.table import Table

    from deploykit.backends.base import BACKENDS, get_backend
    from deploykit.errors import DeployError
    from deploykit.precision import cpu_flags
    from deploykit.profiles import list_profiles, load_profile

    flags = cpu_flags()
    rows = []
    for name in sorted(BACKENDS):
        backend = get_backend(name)
        version = backend.version()
        rows.append({"target": name, "available": version is not None, "version": version,
                     "precisions": list(backend.precisions), "install": f"pip install 'deploykit[{backend.extra}]'",
                     "options": sorted(backend.options),
                     "variants": {p: v for p in backend.precisions if (v := backend.variants(p, flags))},
                     "status": backend.status()})
    profiles = []
    for name, path in list_profiles().items():
        try:
            p = load_profile(str(path))
            profiles.append({"profile": name, "target": p.target, "precision": p.precision, "options": p.options,
                             "description": p.description})
        except DeployError as err:
            profiles.append({"profile": name, "error": str(err)})
    if as_json:
        click.echo(json.dumps({"targets": rows, "profiles": profiles}, indent=2))
        return
    table = Table(title="targets")
    for column in ("target", "available", "version", "precisions", "note"):
        table.add_column(column, no_wrap=column != "note")
    from rich.markup import escape

    for r in rows:
        note = r["status"] or ("" if r["available"] else r["install"])
        table.add_row(r["target"], "yes" if r["available"] else "no", r["version"] or "-",
                      ", ".join(r["precisions"]), escape(note))
    console = Console()
    console.print(table)
    ptable = Table(title="profiles (--target NAME; options: targets/NAME.yaml or --json)")
    for column in ("profile", "target", "precision", "description"):
        ptable.add_column(column, no_wrap=column != "description")
    for p in profiles:
        if "error" in p:
            ptable.add_row(p["profile"], "-", "-", f"[red]{escape(p['error'])}")
        else:
            ptable.add_row(p["profile"], p["target"], p["precision"] or "-", p["description"])
    console.print(ptable)
