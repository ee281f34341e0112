"""Run a sweep: prepare each configuration, time groups with interleaved rounds, append rows.

Within a group (same input size, batch and threads) every configuration is warmed up, then
timed one round at a time in turn, A B C A B C ..., so slow drift of the machine (thermal,
other load) hits all of them alike and round i of A and B are a fair pair. A row is appended
to the results file as soon as its group is done; a failed configuration gets a row with its
error and the sweep goes on. Rows already in the file for this device are not measured again.
"""
from __future__ import annotations

import datetime as dt
import itertools
import logging
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.bench import results
from deploykit.bench.spec import Config, SweepSpec, config_id, configurations
from deploykit.errors import DeployError

logger = logging.getLogger(__name__)

# on_progress(done, total, what): work units are one build/load and one round per configuration.
Progress = Callable[[int, int, str], None]
Prepare = Callable[[Config, SweepSpec], Any]
RowSink = Callable[[dict[str, Any]], None]  # receives each finished row (default: append to the file)


@dataclass(eq=False)  # hashed by identity: a key of the interleaved rounds
class _Timed:
    """A configuration being timed: its runner, warm-up result and round times so far."""

    config: Config
    prepared: Any
    measure: Any
    warmup: Any = None
    iterations: int = 0
    rounds: list[list[float]] = field(default_factory=list)


@dataclass
class SweepOutcome:
    measured: int = 0
    skipped: int = 0  # cannot run here (NotRunnable)
    failed: int = 0
    already_done: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _default_prepare(config: Config, spec: SweepSpec) -> Any:
    from deploykit.bench.prepare import check_runnable, prepare

    return prepare(config, spec, check_runnable(config))


class _Sweep:
    def __init__(self, spec: SweepSpec, path: Path | None, *, command: str | None, prepare: Prepare,
                 on_progress: Progress | None, device: dict[str, Any] | None = None,
                 write_row: RowSink | None = None) -> None:
        from deploykit.device import device_fingerprint, tool_versions

        self.spec, self.prepare = spec, prepare
        self.path = Path(path) if path is not None else None
        self.write_row = write_row or (lambda row: results.append_row(self.path, row))
        self.on_progress = on_progress or (lambda done, total, what: None)
        self.done_units = 0
        self.total_units = 0
        self.device = device or device_fingerprint()
        self.context = {
            "versions": tool_versions(),
            "sweep": {"name": spec.name, "description": spec.description, "command": command,
                      "compare": [c.model_dump() for c in spec.compare]},
        }
        self.outcome = SweepOutcome()

    def _tick(self, what: str, units: int = 1) -> None:
        self.done_units += units
        self.on_progress(self.done_units, self.total_units, what)

    def _row(self, config: Config, status: str, **extra: Any) -> dict[str, Any]:
        from deploykit.device import load_average

        row = {
            "schema": results.SCHEMA,
            "status": status,
            "config_id": config_id(config, self.spec),
            "config": config.describe(),
            "device": self.device,
            **self.context,
            "load_average": load_average(),
            "finished_at": _now(),
            **extra,
        }
        self.write_row(row)
        self.outcome.rows.append(row)
        return row

    def _fail(self, config: Config, status: str, err: BaseException) -> None:
        reason = str(err) if isinstance(err, DeployError) else f"{type(err).__name__}: {err}"
        if not isinstance(err, DeployError):  # a bug somewhere; keep the traceback in the log
            logger.debug("%s failed:\n%s", config.short(), "".join(traceback.format_exception(err)))
        logger.warning("%s: %s: %s", config.short(), status, reason)
        self._row(config, status, reason=reason.splitlines()[0] if reason else type(err).__name__)
        if status == "skipped":
            self.outcome.skipped += 1
        else:
            self.outcome.failed += 1

    def _prepare_all(self, group: list[Config]) -> list[_Timed]:
        from deploykit.bench.prepare import NotRunnable
        from deploykit.bench.timing import timer_for

        live = []
        for config in group:
            try:
                prepared = self.prepare(config, self.spec)
            except NotRunnable as err:
                self._fail(config, "skipped", err)
                self._tick(config.short(), 1 + self.spec.rounds)
                continue
            except Exception as err:  # one configuration failing must not stop the sweep
                self._fail(config, "failed", err)
                self._tick(config.short(), 1 + self.spec.rounds)
                continue
            self._tick(f"built {config.short()}")
            live.append(_Timed(config, prepared, timer_for(prepared.backend, prepared.runner, prepared.inputs)))
        return live

    def run_group(self, group: list[Config]) -> None:
        """Prepare, warm up, then time every configuration of ``group`` round by round, interleaved."""
        from deploykit.bench.timing import interleaved_rounds, iterations_per_round, warm_up

        spec = self.spec
        live = self._prepare_all(group)
        for item in list(live):
            try:
                item.warmup = warm_up(item.measure, tolerance=spec.warmup_tolerance,
                                      min_time_s=spec.warmup_min_time, max_time_s=spec.warmup_max_time)
            except Exception as err:
                self._fail(item.config, "failed", err)
                live.remove(item)
                self._tick(item.config.short(), spec.rounds)
                continue
            item.iterations = iterations_per_round(item.warmup.per_iteration_s, spec.min_round_time)
        run_id = uuid.uuid4().hex[:12]

        def failed(item: _Timed, round_index: int, err: Exception) -> None:
            self._fail(item.config, "failed", err)
            live.remove(item)
            self._tick(item.config.short(), spec.rounds - round_index)

        times = interleaved_rounds(
            {item: item.measure for item in live}, {item: item.iterations for item in live}, spec.rounds,
            on_error=failed,
            on_round=lambda item, r: self._tick(f"round {r + 1}/{spec.rounds} {item.config.short()}"),
        )
        for item in live:
            item.rounds = [r.tolist() for r in times[item]]
        for item in live:
            try:
                self._finish(item, run_id)
            except Exception as err:
                self._fail(item.config, "failed", err)

    def _finish(self, item: _Timed, run_id: str) -> None:
        import numpy as np

        from deploykit.bench.stats import summarize

        config, prepared, w = item.config, item.prepared, item.warmup
        summary = summarize(item.rounds, seed=self.spec.seed)
        memory = None
        if self.spec.memory:
            from deploykit.bench.memory import measure_memory

            memory = measure_memory(prepared.artifact.path, threads=config.threads, batch=config.batch,
                                    input_size=int(prepared.inputs.shape[-1]),
                                    iterations=self.spec.memory_iterations, seed=self.spec.seed)
        clock = prepared.backend.clock()
        self._row(
            config, results.STATUS_OK,
            group_run=run_id,
            timing={
                "clock": clock,
                "warmup_iterations": w.iterations,
                "warmup_s": round(w.seconds, 3),
                "warmup_stable": w.stable,
                "iterations_per_round": item.iterations,
                "min_round_time_s": self.spec.min_round_time,
            },
            round_medians_ms=[float(np.median(r)) for r in item.rounds],
            summary=summary.to_dict(),
            build=prepared.build,
            memory=memory,
        )
        self.outcome.measured += 1
        prepared.runner = None  # let the runtime free the model before the next group

    def run(self, retry_failed: bool) -> SweepOutcome:
        results.check_appendable(self.path)
        todo = configurations(self.spec)
        done = self._done_ids(retry_failed)
        pending = [c for c in todo if config_id(c, self.spec) not in done]
        self.outcome.already_done = len(todo) - len(pending)
        if self.outcome.already_done:
            logger.info("%d of %d configurations already in %s", self.outcome.already_done, len(todo), self.path)
        self.total_units = len(pending) * (1 + self.spec.rounds)
        self.on_progress(0, self.total_units, "starting")
        for _, group in itertools.groupby(pending, key=lambda c: c.group):
            self.run_group(list(group))
        return self.outcome

    def _done_ids(self, retry_failed: bool) -> set[str]:
        if not self.path.exists():
            return set()
        rows = results.read_rows(self.path)
        keep = {results.STATUS_OK} if retry_failed else None
        return {
            r["config_id"] for r in rows
            if r["device"]["id"] == self.device["id"] and (keep is None or r["status"] in keep)
        }


def run_sweep(
    spec: SweepSpec,
    results_path: Path,
    *,
    retry_failed: bool = False,
    command: str | None = None,
    on_progress: Progress | None = None,
    prepare: Prepare | None = None,
) -> SweepOutcome:
    """Measure every configuration of ``spec`` not yet in ``results_path`` (for this device).

    ``prepare(config, spec)`` returns an object with ``runner``, ``inputs``, ``artifact``,
    ``build`` and ``backend``; the default builds artifacts through the backends. ``retry_failed`` measures
    configurations whose earlier row failed or was skipped again.
    """
    sweep = _Sweep(spec, results_path, command=command, prepare=prepare or _default_prepare, on_progress=on_progress)
    return sweep.run(retry_failed)


def measure_group(
    spec: SweepSpec,
    group: list[Config],
    *,
    write_row: RowSink,
    device: dict[str, Any] | None = None,
    command: str | None = None,
    on_progress: Progress | None = None,
    prepare: Prepare | None = None,
) -> SweepOutcome:
    """Measure one group of configurations exactly as ``run_sweep`` does, handing each row to
    ``write_row`` instead of a file: what a fleet node runs (``deploykit.bench.fleet``).

    ``device`` replaces this machine's fingerprint in the rows (a fleet node adds its label).
    """
    sweep = _Sweep(spec, None, command=command, prepare=prepare or _default_prepare, on_progress=on_progress,
                   device=device, write_row=write_row)
    sweep.total_units = len(group) * (1 + spec.rounds)
    sweep.on_progress(0, sweep.total_units, "starting")
    sweep.run_group(group)
    return sweep.outcome
