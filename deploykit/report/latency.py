"""The latency report's content: which rows, which marks, which comparisons and verdicts."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.bench.results import STATUS_OK, latest_rows, read_many

CONFIG_FIELDS = ("model", "form", "target", "precision", "batch", "threads", "input_size")
MARK_UNSTABLE = "~"
MARK_VERSION = "†"


@dataclass
class ComparisonRow:
    name: str
    device: str
    axis: str
    baseline: str
    candidate: str
    where: dict[str, Any]  # the other config fields, shared by both rows
    target_name: str = ""
    ratio: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    paired: bool = False
    verdict: str = ""
    outcome: str = ""  # holds, does not hold, within noise, no claim, not measured
    unstable: bool = False
    memory_bytes: tuple[int, int] | None = None  # inference peak increase (baseline, candidate)


@dataclass
class LatencyReport:
    rows: list[dict[str, Any]]  # latest per (device, config); ok and not-ok
    devices: dict[str, dict[str, Any]]
    versions: dict[str, dict[str, str]]  # device id -> union of tool versions
    marks: dict[int, list[str]]  # id(row) -> marks
    version_notes: list[str]
    comparisons: list[ComparisonRow]
    claim_summaries: list[str]
    commands: list[str]
    sources: list[str]
    sweeps: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def measured(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == STATUS_OK]


def device_label(device: dict[str, Any]) -> str:
    gpu = device.get("gpus") or []
    name = gpu[0]["name"] if gpu else device.get("cpu") or "unknown CPU"
    # A fleet host's label (`ray start --labels device=NAME`) names it first: hosts with the same
    # hardware are still different devices.
    label = f"{device['label']}: " if device.get("label") else ""
    return f"{label}{name} ({device['id'][:6]})"


def _row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    c = row["config"]
    return (device_label(row["device"]), c["model"], c["form"], c["target"], c["precision"], c["batch"], c["threads"],
            c.get("input_size") or 0)


def _version_marks(rows: list[dict[str, Any]]) -> tuple[dict[int, list[str]], list[str]]:
    """Mark rows whose deploykit or runtime version differs from the most common one for their target."""
    by_target: dict[str, list[tuple[dict[str, Any], tuple[str, str]]]] = defaultdict(list)
    for row in rows:
        if row["status"] != STATUS_OK:
            continue
        versions = (row["versions"].get("deploykit", "?"), str(row.get("build", {}).get("runtime_version", "?")))
        by_target[row["config"]["target_name"]].append((row, versions))
    marks: dict[int, list[str]] = defaultdict(list)
    notes = []
    for target, items in sorted(by_target.items()):
        counts = Counter(v for _, v in items)
        if len(counts) < 2:
            continue
        common = counts.most_common(1)[0][0]
        seen = ", ".join(f"deploykit {d} / {target} {r} ({n} rows)" for (d, r), n in counts.most_common())
        notes.append(f"{MARK_VERSION} {target}: rows from different tool versions: {seen}")
        for row, versions in items:
            if versions != common:
                marks[id(row)].append(MARK_VERSION)
    return marks, notes


def _claims_for(comparison: dict[str, Any], row: ComparisonRow) -> list[dict[str, Any]]:
    return [c for c in comparison.get("claims", [])
            if not c["targets"] or row.where["target"] in c["targets"] or row.target_name in c["targets"]]


def describe_change(candidate: str, ratio: float, ci_low: float, ci_high: float) -> str:
    """'X faster by 7.2% [4.1%, 9.8%]': the candidate's lower (or higher) median latency."""
    if ratio <= 1.0:
        return f"{candidate} faster by {1 - ratio:.1%} [{1 - ci_high:.1%}, {1 - ci_low:.1%}]"
    return f"{candidate} slower by {ratio - 1:.1%} [{ci_low - 1:.1%}, {ci_high - 1:.1%}]"


def _verdict(comp: dict[str, Any], row: ComparisonRow) -> None:
    """Set the row's outcome and verdict text from its measured ratio and the comparison's claims.

    A difference counts when the interval excludes 1 and the ratio is off 1 by at least
    ``noise``; otherwise it is within noise. A claim of *no* difference holds only when the
    whole interval lies within 1 +/- noise (a wide interval proves nothing either way).
    """
    r, lo, hi, noise = row.ratio, row.ci_low, row.ci_high, comp["noise"]
    change = f"{describe_change(row.candidate, r, lo, hi)} on {row.where['target']}"
    if abs(1 - r) < noise:
        found, noise_text = "same", f"within noise (<{noise:.0%})"
    elif lo <= 1.0 <= hi:
        found, noise_text = "same", "within noise (interval includes 1)"
    else:
        found, noise_text = ("candidate_faster" if r < 1 else "baseline_faster"), ""
    equivalent = 1 - noise < lo and hi < 1 + noise
    claims = _claims_for(comp, row)
    outcomes = []
    for claim in claims:
        if claim["expect"] == "same":
            outcomes.append("claim holds" if equivalent else "claim does not hold" if found != "same"
                            else f"inconclusive (interval wider than ±{noise:.0%})")
        elif found == claim["expect"]:
            outcomes.append("claim holds")
        else:
            outcomes.append(noise_text if found == "same" else "claim does not hold")
    if not outcomes:
        outcomes = [noise_text] if noise_text else []
    first = outcomes[0] if outcomes else "no claim"
    row.outcome = first.split(" (")[0].removeprefix("claim ")
    unstable = " (unstable measurement)" if row.unstable else ""
    row.verdict = f"{change}{' — ' + '; '.join(outcomes) if outcomes else ''}{unstable}"


def _memory_pair(base: dict[str, Any], cand: dict[str, Any]) -> tuple[int, int] | None:
    key = "inference_peak_increase_bytes"
    mb, mc = base.get("memory") or {}, cand.get("memory") or {}
    return (mb[key], mc[key]) if key in mb and key in mc else None


def _comparisons(rows: list[dict[str, Any]], comparisons: dict[str, dict[str, Any]]) -> list[ComparisonRow]:
    from deploykit.bench.stats import ratio_of_medians

    ok = [r for r in rows if r["status"] == STATUS_OK and r.get("round_medians_ms")]
    out = []
    for name, comp in comparisons.items():
        axis = comp["axis"]
        others = [f for f in CONFIG_FIELDS if f != axis]
        sides: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = defaultdict(dict)
        for row in ok:
            value = row["config"][axis]
            if value in (comp["baseline"], comp["candidate"]):
                key = (row["device"]["id"], *(row["config"].get(f) for f in others))
                sides[key]["baseline" if value == comp["baseline"] else "candidate"] = row
        for key, pair in sorted(sides.items(), key=lambda kv: str(kv[0])):
            if len(pair) < 2:
                continue
            base, cand = pair["baseline"], pair["candidate"]
            paired = (base.get("group_run") == cand.get("group_run")
                      and len(base["round_medians_ms"]) == len(cand["round_medians_ms"]))
            ratio = ratio_of_medians(cand["round_medians_ms"], base["round_medians_ms"], paired=paired)
            row = ComparisonRow(
                name=name, device=device_label(base["device"]), axis=axis, baseline=comp["baseline"],
                candidate=comp["candidate"], where=dict(zip(others, key[1:])), ratio=ratio.ratio,
                ci_low=ratio.ci_low, ci_high=ratio.ci_high, paired=paired,
                unstable=bool(base["summary"]["unstable"] or cand["summary"]["unstable"]),
                target_name=base["config"]["target_name"],
                memory_bytes=_memory_pair(base, cand),
            )
            _verdict(comp, row)
            out.append(row)
    return out


def _claim_summaries(rows: list[dict[str, Any]], comparisons: dict[str, dict[str, Any]],
                     found: list[ComparisonRow]) -> list[str]:
    """Per comparison, claim and target: how many configurations agree; unmeasured targets said so."""
    lines = []
    for name, comp in comparisons.items():
        for claim in comp.get("claims", []):
            targets = claim["targets"] or sorted({r["config"]["target"] for r in rows})
            for target in targets:
                mine = [r for r in found if r.name == name and target in (r.where["target"], r.target_name)]
                if not mine:
                    reasons = sorted({r.get("reason", "") for r in rows if r["status"] != STATUS_OK
                                      and target in (r["config"]["target"], r["config"]["target_name"])})
                    why = f": {reasons[0]}" if reasons else ": no rows for this target"
                    lines.append(f"**{name}** on {target}: not measured{why}. Claim: {claim['text']}")
                    continue
                tally = Counter(r.outcome for r in mine)
                parts = ", ".join(f"{n} {k}" for k, n in tally.most_common())
                lines.append(f"**{name}** on {target}: {parts} (of {len(mine)} configurations). Claim: {claim['text']}")
    return lines


def build_report(paths: list[Path]) -> LatencyReport:
    """Read, merge (latest row per device and configuration) and analyse result files."""
    rows = sorted(latest_rows(read_many(paths)), key=_row_key)
    devices = {r["device"]["id"]: r["device"] for r in rows}
    versions: dict[str, dict[str, str]] = defaultdict(dict)
    comparisons: dict[str, dict[str, Any]] = {}
    commands, sweeps = [], {}
    for row in rows:
        versions[row["device"]["id"]].update(row.get("versions", {}))
        sweep = row.get("sweep") or {}
        for comp in sweep.get("compare", []):
            comparisons.setdefault(comp["name"], comp)
        if sweep.get("name"):
            sweeps.setdefault(sweep["name"], sweep)
        if sweep.get("command") and sweep["command"] not in commands:
            commands.append(sweep["command"])
    marks, notes = _version_marks(rows)
    for row in rows:
        if row["status"] == STATUS_OK and row["summary"]["unstable"]:
            marks[id(row)].append(MARK_UNSTABLE)
    found = _comparisons(rows, comparisons)
    return LatencyReport(
        rows=rows, devices=devices, versions=dict(versions), marks=dict(marks), version_notes=notes,
        comparisons=found, claim_summaries=_claim_summaries(rows, comparisons, found), commands=commands,
        sources=[str(p) for p in paths], sweeps=sweeps,
    )
