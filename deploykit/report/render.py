"""Render a LatencyReport as Markdown, CSV and HTML (same rows, same marks in each)."""
from __future__ import annotations

import csv
import html
import io
from typing import Any

from deploykit.bench.results import STATUS_OK
from deploykit.device import describe_cpu
from deploykit.report.latency import MARK_UNSTABLE, LatencyReport, device_label

COLUMNS = ("device", "model", "form", "target", "precision", "batch", "threads", "input", "median ms [95% CI]",
           "p90 ms", "min ms", "IQR ms", "CV", "rounds", "MACs", "size MB", "inference mem MB", "marks")
CSV_COLUMNS = ("device_id", "device", "model", "form", "target", "precision", "batch", "threads", "input_size",
               "status", "median_ms", "ci_low_ms", "ci_high_ms", "p90_ms", "min_ms", "iqr_ms", "cv", "rounds",
               "iterations_per_round", "macs", "params", "size_bytes", "inference_peak_increase_bytes",
               "process_peak_bytes", "deploykit", "runtime_version", "marks", "note")

METHOD = """\
Each configuration is warmed up until the median of its last 5 iterations moves by less than
2% (bounded in time), then timed in rounds: every round runs enough iterations to last the
sweep's `min_round_time` and keeps their median. Rounds of all configurations that share batch
size, threads and input size are interleaved (A B C A B C ...), so drift hits all of them alike.
Reported: median of round medians with a seeded percentile-bootstrap 95% interval over rounds;
p90, min and IQR of single iterations pooled over rounds; CV = coefficient of variation of round
medians. A figure is marked unstable (~) when CV > 10%, the interval half-width exceeds 5% of
the median, or fewer than 5 rounds were run. A comparison's ratio is median(candidate) /
median(baseline) with a bootstrap interval that resamples paired rounds together (rounds
timed back to back) or each side alone when the rows come from different runs. "Faster by X%"
means X% lower median latency."""

MEMORY_METHOD = """\
Memory: each artifact is loaded in a fresh process; after loading, the kernel's peak-RSS mark
is reset (`/proc/self/clear_refs`), the model runs N times and the new peak (VmHWM) minus the
resident set before inference is the "inference mem" column: activations, workspaces and arenas
that inference allocates. The process peak (interpreter, runtime, model, loading) is in the CSV."""


def _mb(value: Any) -> str:
    return f"{value / 1e6:.3g}" if isinstance(value, (int, float)) else ""


def _macs(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return ""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def _ms(value: float) -> str:
    """Four significant digits: 0.01234, 1.234, 123.4."""
    return f"{value:.4g}" if value < 1000 else f"{value:.0f}"


def table_rows(report: LatencyReport) -> list[list[str]]:
    """The measured rows as strings."""
    out = []
    for row in report.measured:
        c, marks = row["config"], " ".join(report.marks.get(id(row), []))
        s, build, mem = row["summary"], row.get("build") or {}, row.get("memory") or {}
        out.append([
            device_label(row["device"]), c["model"], c["form"], c["target"], c["precision"], str(c["batch"]),
            str(c["threads"]), str(build.get("input_size") or c.get("input_size") or ""),
            f"{_ms(s['median_ms'])} [{_ms(s['ci_low_ms'])}, {_ms(s['ci_high_ms'])}]",
            _ms(s["p90_ms"]), _ms(s["min_ms"]), _ms(s["iqr_ms"]), f"{s['cv']:.1%}", str(s["rounds"]),
            _macs(build.get("macs")), _mb(build.get("size_bytes")),
            "error" if mem.get("error") else _mb(mem.get("inference_peak_increase_bytes")), marks,
        ])
    return out


NOT_MEASURED_COLUMNS = ("device", "model", "form", "target", "precision", "batch", "threads", "status", "reason")


def not_measured_rows(report: LatencyReport) -> list[list[str]]:
    """Configurations without a measurement here, and why (no GPU, backend missing, failure)."""
    return [[device_label(r["device"]), r["config"]["model"], r["config"]["form"], r["config"]["target"],
             r["config"]["precision"], str(r["config"]["batch"]), str(r["config"]["threads"]), r["status"],
             r.get("reason", "")] for r in report.rows if r["status"] != STATUS_OK]


def comparison_rows(report: LatencyReport) -> list[list[str]]:
    out = []
    for comp in report.comparisons:
        where = comp.where
        out.append([comp.name, comp.device, str(where.get("target", "")), str(where.get("model", "")),
                    str(where.get("form", "")), str(where.get("precision", "")), str(where.get("batch", "")),
                    str(where.get("threads", "")),
                    f"{comp.ratio:.3f} [{comp.ci_low:.3f}, {comp.ci_high:.3f}]{' ' + MARK_UNSTABLE if comp.unstable else ''}",
                    "paired" if comp.paired else "unpaired",
                    f"{_mb(comp.memory_bytes[0])} → {_mb(comp.memory_bytes[1])}" if comp.memory_bytes else "",
                    comp.verdict])
    return out


COMPARISON_COLUMNS = ("comparison", "device", "target", "model", "form", "precision", "batch", "threads",
                      "ratio cand/base [95% CI]", "rounds", "inference mem MB base → cand", "verdict")


def _md_table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _notes(report: LatencyReport) -> list[str]:
    notes = []
    unstable = [r for r in report.measured if MARK_UNSTABLE in report.marks.get(id(r), [])]
    if unstable:
        notes.append(f"{MARK_UNSTABLE} unstable measurement:")
        for r in unstable:
            c = r["config"]
            notes.append(f"  - {device_label(r['device'])}: {c['model']} {c['form']} {c['target']} {c['precision']} "
                         f"b{c['batch']} t{c['threads']}: {'; '.join(r['summary']['unstable_reasons'])}")
    notes += report.version_notes
    return notes


DEVICE_COLUMNS = ("device", "CPU", "ISA", "cores", "memory", "OS", "GPU", "load average (max while measuring)")


def _device_rows(report: LatencyReport) -> list[list[str]]:
    rows = []
    for dev_id, dev in report.devices.items():
        gpus = "; ".join(f"{g['name']} (CC {g['compute_capability']}, driver {g.get('driver') or '?'})"
                         for g in dev.get("gpus", [])) or "none"
        loads = [r["load_average"] for r in report.measured
                 if r["device"]["id"] == dev_id and isinstance(r.get("load_average"), (int, float))]
        rows.append([device_label(dev), describe_cpu(dev), ", ".join(dev.get("isa", [])) or "none listed",
                     f"{dev.get('physical_cores') or '?'} physical / {dev.get('logical_cores') or '?'} logical",
                     f"{(dev.get('memory_bytes') or 0) / 2**30:.1f} GiB", dev.get("os", ""), gpus,
                     f"{max(loads):.1f}" if loads else "?"])
    return rows


def same_hardware_notes(report: LatencyReport) -> list[str]:
    """Devices that are one machine (or identical machines): fleet hosts with one fingerprint."""
    by_hardware: dict[str, list[str]] = {}
    for dev in report.devices.values():
        by_hardware.setdefault(dev.get("hardware_id") or dev["id"], []).append(device_label(dev))
    return [f"{', '.join(sorted(names))} have the same hardware fingerprint ({hw}): nodes of one machine or "
            "identical machines, so their differences are run-to-run noise, not hardware"
            for hw, names in sorted(by_hardware.items()) if len(names) > 1]


def _version_rows(report: LatencyReport) -> list[list[str]]:
    return [[device_label(report.devices[d]), ", ".join(f"{k} {v}" for k, v in sorted(vs.items()))]
            for d, vs in report.versions.items()]


def to_markdown(report: LatencyReport, *, title: str, plots: list[str], report_command: str | None) -> str:
    parts = [f"# {title}", ""]
    for sweep in report.sweeps.values():
        if sweep.get("description"):
            parts += [sweep["description"].strip(), ""]
    parts += ["## Verdict", ""]
    parts += [f"- {line}" for line in report.claim_summaries] or ["- no comparisons declared by the sweep"]
    if report.comparisons:
        parts += ["", "## Comparisons", "", _md_table(COMPARISON_COLUMNS, comparison_rows(report))]
    parts += ["", "## Results", "", _md_table(COLUMNS, table_rows(report)), ""]
    parts += [f"{n}" if n.startswith("  ") else f"- {n}" for n in _notes(report)]
    if not_measured_rows(report):
        parts += ["", "## Not measured", "", _md_table(NOT_MEASURED_COLUMNS, not_measured_rows(report))]
    if plots:
        parts += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    parts += ["", "## Devices", "", _md_table(DEVICE_COLUMNS, _device_rows(report))]
    if same := same_hardware_notes(report):
        parts += [""] + [f"- {n}" for n in same]
    parts += ["", "## Versions", "", _md_table(("device", "versions"), _version_rows(report))]
    parts += ["", "## Method", "", METHOD]
    if any(r.get("memory") for r in report.measured):
        parts += ["", MEMORY_METHOD]
    parts += ["", "## Reproduce", "", "```"] + report.commands
    if report_command:
        parts.append(report_command)
    parts += ["```", "", f"Sources: {', '.join(report.sources)}", ""]
    return "\n".join(parts)


def to_csv(report: LatencyReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for row in report.rows:
        c, s = row["config"], row.get("summary") or {}
        build, mem = row.get("build") or {}, row.get("memory") or {}
        note = row.get("reason") or "; ".join(s.get("unstable_reasons", [])) or mem.get("error", "")
        writer.writerow([
            row["device"]["id"], device_label(row["device"]), c["model"], c["form"], c["target"], c["precision"],
            c["batch"], c["threads"], build.get("input_size") or c.get("input_size") or "", row["status"],
            *(s.get(k, "") for k in ("median_ms", "ci_low_ms", "ci_high_ms", "p90_ms", "min_ms", "iqr_ms", "cv",
                                     "rounds")),
            (row.get("timing") or {}).get("iterations_per_round", ""), build.get("macs", ""), build.get("params", ""),
            build.get("size_bytes", ""), mem.get("inference_peak_increase_bytes", ""),
            mem.get("process_peak_bytes", ""), row.get("versions", {}).get("deploykit", ""),
            build.get("runtime_version", ""), " ".join(report.marks.get(id(row), [])), note,
        ])
    return buffer.getvalue()


def _html_table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(report: LatencyReport, *, title: str, plots: list[str], report_command: str | None) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:90%}"
             "td,th{border:1px solid #ccc;padding:2px 6px}th{background:#eee}pre{background:#f6f6f6;padding:1em}"
             "</style></head><body>", f"<h1>{esc(title)}</h1>"]
    parts += [f"<p>{esc(s['description'])}</p>" for s in report.sweeps.values() if s.get("description")]
    parts += ["<h2>Verdict</h2><ul>"] + [f"<li>{esc(line.replace('**', ''))}</li>" for line in report.claim_summaries]
    parts.append("</ul>")
    if report.comparisons:
        parts += ["<h2>Comparisons</h2>", _html_table(COMPARISON_COLUMNS, comparison_rows(report))]
    parts += ["<h2>Results</h2>", _html_table(COLUMNS, table_rows(report))]
    parts += ["<ul>"] + [f"<li>{esc(n.strip())}</li>" for n in _notes(report)] + ["</ul>"]
    if not_measured_rows(report):
        parts += ["<h2>Not measured</h2>", _html_table(NOT_MEASURED_COLUMNS, not_measured_rows(report))]
    parts += [f"<p><img src='{esc(p)}' alt='{esc(p)}' style='max-width:100%'></p>" for p in plots]
    parts += ["<h2>Devices</h2>", _html_table(DEVICE_COLUMNS, _device_rows(report))]
    parts += ["<h2>Versions</h2>", _html_table(("device", "versions"), _version_rows(report))]
    parts += ["<h2>Method</h2>", f"<p>{esc(METHOD)}</p>"]
    commands = report.commands + ([report_command] if report_command else [])
    parts += ["<h2>Reproduce</h2>", f"<pre>{esc(chr(10).join(commands))}</pre>", "</body></html>"]
    return "\n".join(parts)
