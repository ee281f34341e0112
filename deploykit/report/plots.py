"""PNG plots of a LatencyReport with matplotlib (object API, no pyplot global state).

- ``latency.png``: median latency with its 95% interval per configuration, one colour per device;
- ``ratios.png``: every comparison's ratio with its interval, the noise band shaded around 1;
- ``batch.png``: latency vs batch size, when the rows hold more than one batch size.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from deploykit.report.latency import LatencyReport, device_label

logger = logging.getLogger(__name__)


def _figure(height_rows: int, width: float = 9.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, max(2.5, 0.28 * height_rows + 1.2)), layout="constrained")


def _colours(keys: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {k: cmap(i % 10) for i, k in enumerate(keys)}


def latency_plot(report: LatencyReport, out: Path) -> bool:
    rows = report.measured
    if not rows:
        return False
    devices = sorted({device_label(r["device"]) for r in rows})
    colour = _colours(devices)
    fig = _figure(len(rows))
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        s = row["summary"]
        ax.errorbar(s["median_ms"], i, xerr=[[s["median_ms"] - s["ci_low_ms"]], [s["ci_high_ms"] - s["median_ms"]]],
                    fmt="o", color=colour[device_label(row["device"])], capsize=3,
                    mfc="none" if s["unstable"] else None)
    ax.set_yticks(range(len(rows)), [
        f"{r['config']['model']} {r['config']['form']} {r['config']['target']} {r['config']['precision']} "
        f"b{r['config']['batch']} t{r['config']['threads']}" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("median latency per batch (ms), 95% interval; hollow = unstable")
    medians = [r["summary"]["median_ms"] for r in rows]
    if max(medians) > 10 * min(medians):
        ax.set_xscale("log")
    ax.grid(axis="x", alpha=0.3)
    if len(devices) > 1:
        for d in devices:
            ax.plot([], [], "o", color=colour[d], label=d)
        ax.legend(fontsize=7)
    fig.savefig(out, dpi=110)
    return True


def ratio_plot(report: LatencyReport, out: Path) -> bool:
    comps = report.comparisons
    if not comps:
        return False
    fig = _figure(len(comps))
    ax = fig.add_subplot()
    colour = _colours(sorted({c.device for c in comps}))
    for i, comp in enumerate(comps):
        ax.errorbar(comp.ratio, i, xerr=[[comp.ratio - comp.ci_low], [comp.ci_high - comp.ratio]], fmt="o",
                    color=colour[comp.device], capsize=3, mfc="none" if comp.unstable else None)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.axvspan(0.95, 1.05, color="grey", alpha=0.15, label="within 5%")
    ax.set_yticks(range(len(comps)), [
        f"{c.name}: " + " ".join(str(c.where[k]) for k in ("model", "form", "target", "precision") if k in c.where)
        + f" b{c.where.get('batch')} t{c.where.get('threads')}" for c in comps], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("latency ratio candidate / baseline (< 1: candidate faster), 95% interval")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(out, dpi=110)
    return True


def batch_plot(report: LatencyReport, out: Path) -> bool:
    if len({r["config"]["batch"] for r in report.measured}) < 2:
        return False
    from matplotlib import colormaps

    several_devices = len({r["device"]["id"] for r in report.measured}) > 1
    series: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for row in report.measured:
        c = row["config"]
        key = f"{c['model']} {c['form']} {c['target']} {c['precision']} t{c['threads']}"
        series[key + (f" {device_label(row['device'])}" if several_devices else "")].append((c["batch"], row["summary"]))
    fig = _figure(12, width=11.0)
    ax = fig.add_subplot()
    cmap = colormaps["tab20"]
    for i, (key, points) in enumerate(sorted(series.items())):
        points.sort(key=lambda p: p[0])
        ys = [p[1]["median_ms"] for p in points]
        err = [[p[1]["median_ms"] - p[1]["ci_low_ms"] for p in points],
               [p[1]["ci_high_ms"] - p[1]["median_ms"] for p in points]]
        ax.errorbar([p[0] for p in points], ys, yerr=err, marker="o", capsize=3, label=key, color=cmap(i % 20),
                    linestyle=("-", "--", ":")[i // 20 % 3])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("median latency per batch (ms), 95% interval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(out, dpi=110)
    return True


def write_plots(report: LatencyReport, folder: Path) -> list[str]:
    """Write the plots that apply into ``folder``; return their file names. No matplotlib: none."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning("plots skipped: matplotlib is not installed (pip install 'deploykit[plots]')")
        return []
    written = []
    for name, plot in (("latency.png", latency_plot), ("ratios.png", ratio_plot), ("batch.png", batch_plot)):
        if plot(report, folder / name):
            written.append(name)
    return written
