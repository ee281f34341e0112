"""`deploykit advise`: build every target x precision, measure accuracy and latency, pick one.

Every candidate is built through ``deploykit.build`` (so it is verified, and cached under the
work folder), scored on held-out data (top-1 on labeled images, else top-1 agreement with the
FP32 reference), and timed with the bench protocol (``deploykit.bench.timing``: warm-up
until stable, then rounds interleaved across all candidates in an order rotated each round;
``deploykit.bench.stats``: median of round medians, bootstrap intervals, paired speed-up against
the reference). The chosen artifact is the fastest whose top-1 drop is within the budget.

The reference (the baseline row) is the model as the user has it: PyTorch eager for a PyTorch
model; ONNX Runtime FP32 on the file as given for an ``.onnx`` model, whose candidates are the
targets that build from ONNX (the others are rows saying why they were not built).

Beside each target's defaults, the option sets a backend offers for this CPU
(``Backend.variants``: trade-offs of exactness for speed, such as ONNX Runtime's saturating int8
kernels on x86 without VNNI) are candidates too, so the budget, not a guess, decides them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import DeployError, UsageError
from deploykit.onnxio import is_onnx_model  # light: onnx itself is imported inside its functions

logger = logging.getLogger(__name__)

BASELINE = "PyTorch eager"
ONNX_BASELINE = "ONNX Runtime FP32 (the file as given)"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class AdviseRequest:
    model: str
    calib: str | None = None  # labeled images give top-1; anything else: agreement with the reference
    targets: tuple[str, ...] = ()  # empty: every target available here
    precisions: tuple[str, ...] = ()  # empty: every precision of each target this CPU can run
    max_drop: float = 1.0  # top-1 points (negative: must beat the reference by that much)
    labels: bool = True  # False: score agreement even when the data has labels (they are not the model's classes)
    variants: bool = True  # also each backend's option variants for this CPU (Backend.variants)
    num_classes: int | None = None
    cifar: bool | None = None
    threads: int = 2
    calib_samples: int | None = None
    eval_samples: int = 500
    rounds: int = 5
    round_seconds: float = 1.0
    warmup_seconds: float = 3.0
    work: Path = Path("build/advise")
    seed: int = 0
    force: bool = False


@dataclass
class Candidate:
    """One row: a target x precision x variant (or a hand-made anchor), built, scored and timed."""

    label: str
    target: str | None = None
    precision: str | None = None
    variant: str | None = None  # a Backend.variants name; None: the target's defaults
    options: dict[str, Any] = field(default_factory=dict)  # the variant's options, given to the build
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    top1: float | None = None  # accuracy, or agreement with the reference
    drop: float | None = None  # points below the reference
    summary: Any = None  # bench.stats.Summary
    speedup: Any = None  # bench.stats.Ratio: the baseline's median / this median, paired by round
    rounds: list[np.ndarray] = field(default_factory=list)
    runner: Any = None
    anchor: bool = False
    chosen: bool = False
    rejected: str | None = None

    @property
    def executed(self) -> str:
        plan = (self.meta.get("backend") or {}).get("arithmetic") or {}
        if not plan:
            return "-"
        executes = plan["executes"] + ("" if plan.get("native", True) else " (not native)")
        return f"int8 + {executes}" if self.precision == "int8" else executes  # the float parts' arithmetic

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label, "target": self.target, "precision": self.precision, "variant": self.variant,
            "options": self.options, "executed": self.executed,
            "path": str(self.path) if self.path else None, "error": self.error, "top1": self.top1,
            "drop_points": self.drop, "latency": self.summary.to_dict() if self.summary else None,
            "speedup_vs_baseline": self.speedup.to_dict() if self.speedup else None,
            "size_bytes": self.meta.get("size_bytes"), "anchor": self.anchor, "chosen": self.chosen,
            "rejected": self.rejected,
            "executed_precision": (self.meta.get("backend") or {}).get("executed_precision"),
        }


@dataclass
class Advice:
    request: AdviseRequest
    accuracy: str  # "top-1 on labeled held-out images" or "top-1 agreement with the FP32 reference"
    baseline: Candidate
    candidates: list[Candidate]
    device: dict[str, Any]
    versions: dict[str, str]
    notes: list[str] = field(default_factory=list)  # what the user should know about the model as given

    @property
    def chosen(self) -> Candidate | None:
        return next((c for c in self.candidates if c.chosen), None)

    def to_dict(self) -> dict[str, Any]:
        r = self.request
        return {
            "model": r.model, "calib": r.calib, "max_drop_points": r.max_drop, "accuracy": self.accuracy,
            "threads": r.threads, "rounds": r.rounds, "round_seconds": r.round_seconds,
            "baseline": self.baseline.to_dict(), "candidates": [c.to_dict() for c in self.candidates],
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "device": self.device, "versions": self.versions, "notes": self.notes,
        }


def planned(target: str, precision: str, variant: str | None = None, options: dict[str, Any] | None = None) -> Candidate:
    """A row to build: a target's precision, with its defaults or one of its variants."""
    label = f"{target} {precision}" + (f" [{variant}]" if variant else "")
    return Candidate(label, target, precision, variant, dict(options or {}))


def _folder(row: Candidate) -> str:
    """The row's cache folder name: target-precision[-variant]."""
    slug = re.sub(r"[^a-z0-9]+", "-", row.variant.lower()).strip("-") if row.variant else ""
    return f"{row.target}-{row.precision}" + (f"-{slug}" if slug else "")


def plan(request: AdviseRequest) -> tuple[list[Candidate], list[Candidate]]:
    """Rows to build, and rows for those this machine cannot build (with why)."""
    from deploykit.backends.base import BACKENDS, get_backend
    from deploykit.precision import cpu_flags, refusal

    flags = cpu_flags()
    names = request.targets or tuple(sorted(BACKENDS))
    todo, skipped = [], []
    for name in names:
        backend = get_backend(name)  # unknown name: DeployError listing the targets
        unknown = [p for p in request.precisions if p not in backend.precisions]
        if request.targets and request.precisions and len(unknown) == len(request.precisions):
            raise UsageError(f"target {name} does not build precision {', '.join(unknown)}; "
                             f"choose from {', '.join(backend.precisions)}")
        if backend.version() is None:
            if request.targets:
                raise DeployError(f"target {name} is not available here: pip install 'deploykit[{backend.extra}]'")
            continue
        if is_onnx_model(request.model) and backend.builds_from_module:
            why = f"target {name} builds from a PyTorch model, not from an .onnx file"
            if request.targets:
                raise UsageError(why)
            for precision in request.precisions or backend.precisions:
                if precision in backend.precisions:
                    row = planned(name, precision)
                    row.error = "not built: builds from a PyTorch model, not from an .onnx file"
                    skipped.append(row)
            continue
        for precision in request.precisions or backend.precisions:
            if precision not in backend.precisions:
                continue
            why = refusal(precision, flags)
            if why:
                row = planned(name, precision)
                row.error = f"not on this CPU: {why}"
                skipped.append(row)
                continue
            todo.append(planned(name, precision))
            if request.variants:
                todo += [planned(name, precision, variant, options)
                         for variant, options in backend.variants(precision, flags).items()]
    if not todo:
        raise UsageError("nothing to build: no available target builds the precisions asked for")
    return todo, skipped


def reference(request: AdviseRequest) -> tuple[Candidate, int]:
    """The baseline row with its runner, and the model's input size: PyTorch eager on the model as
    loaded, or ONNX Runtime FP32 on an .onnx file as given (there is no PyTorch model to run)."""
    if is_onnx_model(request.model):
        from deploykit.backends.base import get_backend
        from deploykit.onnxio import check_image_model

        path = Path(request.model)
        size = check_image_model(path)  # a missing, invalid or non-image file: one DeployError line
        if get_backend("onnxruntime").version() is None:
            raise DeployError("advise on an .onnx file runs it on ONNX Runtime as the reference: "
                              "pip install 'deploykit[onnxruntime]'")
        from deploykit.backends.onnxruntime import OnnxRuntimeRunner

        runner = OnnxRuntimeRunner(path, threads=request.threads)
        return Candidate(ONNX_BASELINE, "onnxruntime", "fp32", runner=runner, anchor=True), size
    from deploykit.backends.torch_cpu import TorchRunner
    from deploykit.loading import check_input, load_model

    loaded = load_model(request.model, num_classes=request.num_classes, cifar=request.cifar)
    check_input(loaded)
    runner = TorchRunner(loaded.model.eval(), threads=request.threads)
    return Candidate(BASELINE, "torch", "fp32", runner=runner, anchor=True), loaded.input_size


def _cache_key(request: AdviseRequest) -> str:
    from deploykit import __version__

    identity = {k: getattr(request, k) for k in ("model", "calib", "num_classes", "cifar", "threads",
                                                  "calib_samples", "seed")}
    identity["deploykit"] = __version__
    path = Path(request.model.split(".py:")[0])
    if path.is_file():  # a changed checkpoint or factory is another model
        identity["mtime"] = path.stat().st_mtime_ns
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]


def build_candidates(request: AdviseRequest, todo: list[Candidate], step: Progress) -> list[Candidate]:
    """Build (or reuse from the cache) every planned row; a failed build is a row with its error."""
    from deploykit.backends.base import Artifact
    from deploykit.build import BuildRequest, build

    folder = request.work / _cache_key(request)
    rows = []
    for index, row in enumerate(todo, 1):
        row.path = folder / _folder(row)
        if not request.force and (row.path / "build.json").is_file():
            step(f"[{index}/{len(todo)}] {row.label}: cached")
            row.meta = Artifact.open(row.path).record.model_dump(mode="json")
            rows.append(row)
            continue
        step(f"[{index}/{len(todo)}] building {row.label}")
        try:
            row.meta = build(BuildRequest(
                model=request.model, target=row.target, precision=row.precision, calib=request.calib,
                options=dict(row.options),
                calib_samples=request.calib_samples, out=row.path, threads=request.threads, force=True,
                num_classes=request.num_classes, cifar=request.cifar, seed=request.seed,
            )).meta
        except DeployError as err:
            row.error = str(err).splitlines()[0]
            logger.warning("%s: %s", row.label, row.error)
        rows.append(row)
    return rows


def _eval_set(request: AdviseRequest, input_size: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Held-out inputs (preprocessed as the artifacts are), their labels when the data has them."""
    from deploykit.calib import default_recipe
    from deploykit.calib.sources import labeled_subset

    if request.calib and request.labels:
        try:
            source, labels, indices = labeled_subset(request.calib, "test", request.eval_samples, request.seed)
        except DeployError:
            source = None
        if source is not None:
            pre = default_recipe(input_size).preprocessing
            tensors = np.concatenate([t for _, t in source.iter_load(indices, pre, 64)])
            return tensors, labels[indices], "top-1 on labeled held-out images"
    from deploykit.calib import load_calibration

    data = load_calibration(request.calib, input_size=input_size, num_samples=1, num_verify=request.eval_samples,
                            seed=request.seed + 7)
    why = "labels not used" if request.calib and not request.labels else "the data has no labels"
    return data.held_out, None, f"top-1 agreement with the FP32 reference ({why})"


def score(rows: list[Candidate], baseline: Candidate, inputs: np.ndarray, labels: np.ndarray | None) -> None:
    """Top-1 (or agreement) of every runner on the same inputs; drop in points below the baseline."""
    reference = baseline.runner(inputs).argmax(1)
    truth = labels if labels is not None else reference
    for row in [baseline, *rows]:
        if row.runner is None:
            continue
        predicted = reference if row is baseline else row.runner(inputs).argmax(1)
        row.top1 = float((predicted == truth).mean())
    for row in rows:
        if row.top1 is not None:
            row.drop = (baseline.top1 - row.top1) * 100.0


def time_interleaved(rows: list[Candidate], baseline: Candidate, request: AdviseRequest, x: np.ndarray,
                     step: Progress) -> None:
    """Warm up each runner, then time rounds interleaved across all (bench.timing + bench.stats)."""
    from deploykit.bench.stats import ratio_of_medians, summarize
    from deploykit.backends.base import get_backend
    from deploykit.bench.timing import host_timer, interleaved_rounds, iterations_per_round, timer_for, warm_up

    live = [baseline, *[r for r in rows if r.runner is not None]]
    measures, iterations = {}, {}
    for row in live:
        step(f"warming up {row.label}")
        measures[row.label] = (timer_for(get_backend(row.target), row.runner, x) if row.target and not row.anchor
                               else host_timer(row.runner, x))
        warm = warm_up(measures[row.label], max_time_s=request.warmup_seconds)
        iterations[row.label] = iterations_per_round(warm.per_iteration_s, request.round_seconds)
    step(f"timing {request.rounds} interleaved rounds")
    times = interleaved_rounds(measures, iterations, request.rounds)
    for row in live:
        row.rounds.extend(times[row.label])
    base = [float(np.median(t)) for t in baseline.rounds]
    for row in live:
        row.summary = summarize(row.rounds, seed=request.seed)
        row.speedup = ratio_of_medians(base, [float(np.median(t)) for t in row.rounds])


def choose(rows: list[Candidate], max_drop: float) -> Candidate | None:
    """Mark the fastest row within budget; say why each faster row (and every row over budget) was rejected."""
    timed = sorted((r for r in rows if r.summary is not None and not r.anchor), key=lambda r: r.summary.median_ms)
    chosen = next((r for r in timed if r.drop is not None and r.drop <= max_drop + 1e-9), None)
    for row in timed:
        if row is chosen:
            continue
        if row.drop is None:
            row.rejected = "not scored"
        elif row.drop > max_drop + 1e-9:
            row.rejected = f"top-1 drop {row.drop:.2f} > budget {max_drop:g} points"
        else:
            row.rejected = "within budget, slower than the chosen artifact"
    if chosen is not None:
        chosen.chosen = True
    return chosen


def advise(request: AdviseRequest, *, progress: Progress | None = None,
           anchors: dict[str, Callable[[], Any]] | None = None) -> Advice:
    """Build, score, time and rank; ``anchors``: label -> runner factory timed in the same rounds."""
    from deploykit.backends.base import Artifact, get_backend
    from deploykit.device import device_fingerprint, tool_versions

    step = progress or (lambda text: None)
    todo, skipped = plan(request)
    baseline, input_size = reference(request)
    rows = build_candidates(request, todo, step)
    for row in rows:
        if row.error is None:
            row.runner = get_backend(row.target).load(Artifact.open(row.path), threads=request.threads)
    for label, make in (anchors or {}).items():
        rows.append(Candidate(label, runner=make(), anchor=True))
    step("scoring accuracy")
    inputs, labels, accuracy = _eval_set(request, input_size)
    score(rows, baseline, inputs, labels)
    x = np.random.default_rng(request.seed).standard_normal((1, 3, input_size, input_size))
    time_interleaved(rows, baseline, request, x.astype(np.float32), step)
    choose(rows, request.max_drop)
    for row in rows:
        row.runner = None
    baseline.runner = None
    ordered = sorted(rows, key=lambda r: (r.summary is None, r.summary.median_ms if r.summary else 0.0))
    notes = []
    if is_onnx_model(request.model):
        from deploykit.onnxio import summed_branches

        blocks = summed_branches(Path(request.model))
        if blocks:
            notes = [f"{Path(request.model).name} sums parallel convolution branches in {len(blocks)} blocks "
                     "(RepVGG-style, as trained): the baseline runs the file as given; every build re-parameterized "
                     "them into one convolution per block first"]
    return Advice(request, accuracy, baseline, ordered + skipped, device_fingerprint(), tool_versions(), notes)


def choose_from_file(path: Path, *, model: str, max_drop: float,
                     precision: str | None = None) -> tuple[str, str, dict[str, Any]]:
    """(target, precision, options) of the fastest row within ``max_drop`` in an advice.json written by advise."""
    from deploykit.errors import QualityGateError

    try:
        data = json.loads(Path(path).read_text())
        rows = data["candidates"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DeployError(f"{path} is not an advice.json written by `deploykit advise`") from err
    if data.get("model") != model:
        raise DeployError(f"{path} advises on {data.get('model')!r}, not {model!r}")
    timed = [r for r in rows if not r["anchor"] and r["latency"] and r["drop_points"] is not None
             and (precision is None or r["precision"] == precision)]
    within = sorted((r for r in timed if r["drop_points"] <= max_drop + 1e-9), key=lambda r: r["latency"]["median_ms"])
    if not within:
        raise QualityGateError(f"no artifact in {path} within --max-drop {max_drop:g} points")
    best = within[0]
    return best["target"], best["precision"], dict(best.get("options") or {})  # no options: written before variants
