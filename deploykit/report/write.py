"""Write a latency report: NAME.md, NAME.csv, NAME.html and the plots in NAME/."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from deploykit.errors import DeployError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Written:
    markdown: Path
    csv: Path
    html: Path
    plots: list[Path]
    rows: int
    devices: int


def write_latency_report(
    results: list[Path],
    out: Path,
    *,
    title: str | None = None,
    force: bool = False,
    command: str | None = None,
    plots: bool = True,
) -> Written:
    """Merge ``results`` (any number of files and devices) into the report files at ``out``.

    ``out`` is a path stem: ``reports/convnext`` writes ``reports/convnext.md`` (and .csv,
    .html) and its plots in ``reports/convnext/``. ``command`` is how this report was made,
    printed under "Reproduce" next to the bench commands recorded in the rows.
    """
    from deploykit.files import atomic_dir, atomic_file
    from deploykit.report.latency import build_report
    from deploykit.report.plots import write_plots
    from deploykit.report.render import to_csv, to_html, to_markdown

    if not results:
        raise DeployError("no result files given")
    out = Path(out)
    paths = {ext: out.parent / f"{out.name}.{ext}" for ext in ("md", "csv", "html")}
    plot_dir = out.parent / out.name
    existing = [p for p in (*paths.values(), plot_dir) if p.exists()]
    if existing and not force:
        raise DeployError(f"{existing[0]} exists; pass --force to replace the report")
    report = build_report([Path(p) for p in results])
    if not report.rows:
        raise DeployError(f"no result rows in {', '.join(map(str, results))}")
    if title is None:
        title = f"Latency: {', '.join(report.sweeps)}" if report.sweeps else "Latency"
    names: list[str] = []
    if plots:
        with atomic_dir(plot_dir, force=True) as tmp:
            names = write_plots(report, tmp)
    plot_refs = [f"{out.name}/{n}" for n in names]
    for ext, text in (
        ("md", to_markdown(report, title=title, plots=plot_refs, report_command=command)),
        ("csv", to_csv(report)),
        ("html", to_html(report, title=title, plots=plot_refs, report_command=command)),
    ):
        with atomic_file(paths[ext], force=True) as tmp:
            tmp.write_text(text, encoding="utf-8")
    logger.info("wrote %s (%d rows, %d devices)", paths["md"], len(report.rows), len(report.devices))
    return Written(paths["md"], paths["csv"], paths["html"], [plot_dir / n for n in names], len(report.rows),
                   len(report.devices))
