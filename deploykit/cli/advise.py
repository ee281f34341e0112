"""`deploykit advise`: a thin wrapper over deploykit.advise (and the `--target auto` of build)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from deploykit.cli.build import PRECISIONS, _logs_to, _stderr_console


def run_advice(request: Any, out: Path | None) -> Any:
    """Advise with a progress line on stderr; print the table; write md/json/csv; exit 3 if none fits."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from deploykit.advise import advise
    from deploykit.errors import QualityGateError
    from deploykit.report import advice as render

    console = _stderr_console()
    with console.status("advise: planning") as status, _logs_to(console):
        def step(text: str) -> None:  # labels hold brackets ("onnxruntime int8 [int16 sums]"): not markup
            status.update(f"advise: {escape(text)}")
            console.log(text, markup=False)

        result = advise(request, progress=step)
    table = Table(title="deploykit advise", title_justify="left")
    for column in render.COLUMNS:
        table.add_column(column, no_wrap=column not in ("note",))
    for row in render.rows(result):
        table.add_row(*row)
    stdout = Console(width=max(Console().width, 160))  # a pipe gets 80 columns: too few for the table
    for line in render.header(result):
        stdout.print(line, markup=False, highlight=False)
    stdout.print(table)
    folder = out or request.work
    written = render.write(result, Path(folder))
    click.echo(f"wrote {', '.join(str(p) for p in written)}")
    if result.chosen is None:
        best = min((c.drop for c in result.candidates if c.drop is not None), default=None)
        raise QualityGateError(f"no artifact within --max-drop {request.max_drop:g} points"
                               + (f" (smallest drop {best:.2f})" if best is not None else ""))
    return result


@click.command("advise")
@click.argument("model")
@click.option("--calib", default=None, metavar="PATH",
              help="Data: labeled images (folder per class, .tar.gz) give top-1; else agreement with FP32.")
@click.option("--agreement", is_flag=True,
              help="Score top-1 agreement with FP32 even if --calib has labels (they are not the model's classes).")
@click.option("--max-drop", type=float, default=1.0, show_default=True, help="Largest top-1 drop, in points.")
@click.option("--target", "-t", "targets", multiple=True, help="Targets to try (repeatable; default: all here).")
@click.option("--precision", "-p", "precisions", multiple=True, type=click.Choice(PRECISIONS),
              help="Precisions to try (repeatable; default: every one this CPU can run).")
@click.option("--num-classes", type=click.IntRange(min=1), default=None, help="Classifier size for zoo models.")
@click.option("--cifar", is_flag=True, default=None, help="Zoo model in its CIFAR (32x32) form.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--calib-samples", type=click.IntRange(min=1), default=None, help="INT8 calibration samples.")
@click.option("--eval-samples", "--verify-samples", "eval_samples", type=click.IntRange(min=1), default=500,
              show_default=True, help="Held-out images accuracy is measured on (--verify-samples, as in build).")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True, help="Interleaved timing rounds.")
@click.option("--round-seconds", type=click.FloatRange(min=0.0), default=1.0, show_default=True)
@click.option("--warmup-seconds", type=click.FloatRange(min=0.0), default=3.0, show_default=True)
@click.option("--work", type=click.Path(path_type=Path), default=Path("build/advise"), show_default=True,
              help="Where candidates are built (and cached).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder for advice.md/.json/.csv (default: --work).")
@click.option("--variants/--no-variants", default=True, show_default=True,
              help="Also each target's option variants for this CPU (e.g. ONNX Runtime's faster, saturating int8 "
                   "kernels on x86 without VNNI); `deploykit targets --json` lists them.")
@click.option("--force", is_flag=True, help="Rebuild cached candidates.")
def advise(model: str, calib: str | None, agreement: bool, max_drop: float, targets: tuple[str, ...], precisions: tuple[str, ...],
           num_classes: int | None, cifar: bool | None, threads: int, calib_samples: int | None, eval_samples: int,
           rounds: int, round_seconds: float, warmup_seconds: float, work: Path, out: Path | None,
           variants: bool, force: bool) -> None:
    """Build MODEL for every target x precision (and variant), measure top-1 and latency, and pick the fastest within budget.

    Prints a ranked table (target, precision, variant, executed arithmetic, top-1 and drop, median ms with
    its interval, speed-up vs the baseline, size) and writes it as Markdown, JSON and CSV. Exit
    3 when no artifact is within --max-drop (the table is still printed).

    MODEL is what build takes. The baseline every row is scored and timed against is the model
    as given: PyTorch eager, or ONNX Runtime FP32 on an .onnx file (whose rows are then the
    targets that build from ONNX).

    \b
    Example:
      deploykit advise repvgg_a0 --cifar --num-classes 10 --calib ../shared/data/cifar10-jpeg.tar.gz --max-drop 1.0
      deploykit advise model.onnx --calib images/ --agreement -p fp32 -p int8
    """
    from deploykit.advise import AdviseRequest

    request = AdviseRequest(
        model=model, calib=calib, labels=not agreement, targets=targets, precisions=precisions, max_drop=max_drop,
        num_classes=num_classes, cifar=cifar, threads=threads, calib_samples=calib_samples,
        eval_samples=eval_samples, rounds=rounds, round_seconds=round_seconds, warmup_seconds=warmup_seconds,
        work=work, force=force, variants=variants,
    )
    run_advice(request, out)
