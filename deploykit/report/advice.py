"""Render an ``Advice`` (deploykit.advise) as table rows, Markdown, CSV and JSON; computes nothing."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from deploykit.device import describe_cpu

COLUMNS = ("", "target", "precision", "variant", "executed", "top-1", "drop", "median ms [95% CI]", "speed-up vs baseline",
           "size MB", "note")


def rows(advice: Any) -> list[tuple[str, ...]]:
    """One tuple of cells per candidate, ranked; the baseline first."""
    out = []
    for c in [advice.baseline, *advice.candidates]:
        s, r = c.summary, c.speedup
        note = ("chosen: fastest within budget" if c.chosen else c.rejected or c.error or
                ("hand-made anchor" if c.anchor and c is not advice.baseline else "baseline" if c is advice.baseline
                 else ""))
        if s is not None and s.unstable and not c.error:
            note = f"{note}; unstable: {'; '.join(s.unstable_reasons)}".strip("; ")
        size = c.meta.get("size_bytes")
        out.append((
            "*" if c.chosen else "",
            c.label if c.anchor else c.target,  # the baseline and anchors by name: not a built row
            c.precision or "-",
            c.variant or "-",  # its options: the CSV/JSON, and the Chosen line
            c.executed if c.meta else "-",
            f"{c.top1:.4f}" if c.top1 is not None else "-",
            f"{c.drop:+.2f}" if c.drop is not None else "-",
            f"{s.median_ms:.3f} [{s.ci_low_ms:.3f}, {s.ci_high_ms:.3f}]" if s else "-",
            f"{r.ratio:.2f}x [{r.ci_low:.2f}, {r.ci_high:.2f}]" if r else "-",
            f"{size / 1e6:.2f}" if size else "-",
            note,
        ))
    return out


def option_values(options: dict[str, Any]) -> list[str]:
    """Options as ``--option`` values: ["per_channel=false", ...], sorted."""
    return [f"{k}={str(v).lower()}" for k, v in sorted(options.items())]


def as_flags(options: dict[str, Any]) -> str:
    """Options as the build command line takes them."""
    return " ".join(f"--option {value}" for value in option_values(options))


def header(advice: Any) -> list[str]:
    r, d = advice.request, advice.device
    chosen = advice.chosen
    return [
        f"Model `{r.model}`; accuracy: {advice.accuracy} ({r.eval_samples} samples max); budget: top-1 drop "
        f"<= {r.max_drop:g} points.",
        f"Device: {describe_cpu(d)} ({d['arch']}, {d['usable_cores']} usable cores; ISA {', '.join(d['isa'])}); "
        f"{r.threads} threads, batch 1.",
        f"Timing: {r.rounds} rounds of >= {r.round_seconds:g} s per candidate, interleaved; median of round "
        f"medians, 95% bootstrap interval; speed-up = baseline ({advice.baseline.label}) / candidate, paired by round.",
        (f"Chosen: **{chosen.label}** ({chosen.path}" + (f"; {as_flags(chosen.options)}" if chosen.options else "")
         + ")." if chosen
         else f"No artifact meets the budget of {r.max_drop:g} points."),
        *[f"Note: {note}." for note in advice.notes],
    ]


def markdown(advice: Any, title: str = "deploykit advise") -> str:
    lines = [f"## {title}", "", *[f"- {h}" for h in header(advice)], "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows(advice)]
    return "\n".join(lines) + "\n"


def to_csv(advice: Any) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["chosen", "target", "precision", "variant", "options", "executed", "top1", "drop_points",
                     "median_ms", "ci_low_ms", "ci_high_ms", "speedup", "speedup_ci_low", "speedup_ci_high", "size_bytes", "note"])
    for c, cells in zip([advice.baseline, *advice.candidates], rows(advice)):
        s, r = c.summary, c.speedup
        writer.writerow([int(c.chosen), cells[1], c.precision or "", c.variant or "",
                         json.dumps(c.options, sort_keys=True) if c.variant else "", cells[4], c.top1, c.drop,
                         s.median_ms if s else "", s.ci_low_ms if s else "", s.ci_high_ms if s else "",
                         r.ratio if r else "", r.ci_low if r else "", r.ci_high if r else "",
                         c.meta.get("size_bytes", ""), cells[-1]])
    return buffer.getvalue()


def write(advice: Any, folder: Path, stem: str = "advice") -> list[Path]:
    """advice.md, advice.json, advice.csv in ``folder`` (each written atomically)."""
    from deploykit.files import atomic_file

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, text in ((".md", markdown(advice)), (".json", json.dumps(advice.to_dict(), indent=2, default=str)),
                         (".csv", to_csv(advice))):
        path = folder / f"{stem}{suffix}"
        with atomic_file(path, force=True) as tmp:
            tmp.write_text(text)
        written.append(path)
    return written
