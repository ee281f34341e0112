"""Accuracy-budgeted INT8: try what the diagnosis suggests until the top-1 drop fits.

``fix_quantization`` builds INT8 artifacts of a fused model with a real backend and measures
each on labeled validation samples, trying in order (each step kept only if it lowers the
drop, and the search stops at the first step within budget):

1. the backend's defaults (``base_options``);
1b. weights on always-zero input channels set to zero (``deploykit.quant.dead_channels``; exact);
2. per-channel weight scales (where the backend has a switch; others always use them);
3. cross-layer equalization of conv -> ReLU -> conv pairs (``deploykit.quant.equalize``);
4. bias correction (the backend's own where it has one, else deploykit's in PyTorch);
5. the 1, 2, 4, ... worst layers (``deploykit.quant.analyze``'s ranking) kept in float.

What each backend calls those switches it declares itself (``Backend.max_drop_knobs``, a
``deploykit.backends.base.MaxDropKnobs``), not branches in the loop; a switch a backend lacks is
reported as a skipped step with the reason.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploykit.errors import DeployError, QualityGateError
from deploykit.files import temp_dir

if TYPE_CHECKING:
    from deploykit.backends.base import MaxDropKnobs as Knobs

logger = logging.getLogger(__name__)


DEFAULT_MAX_FP_LAYERS = 4


@dataclass
class Recipe:
    """What is applied: backend options plus model rewrites and float layers."""

    options: dict[str, Any] = field(default_factory=dict)
    zero_dead: bool = False  # weights on always-zero input channels set to 0 (first rewrite)
    equalize: bool = False
    bias_correction: bool = False  # deploykit's PyTorch correction
    float_layers: list[str] = field(default_factory=list)  # PyTorch module names kept in float

    def with_(self, **changes: Any) -> Recipe:
        data = {**asdict(self), **changes}
        return Recipe(**data)


@dataclass
class StepResult:
    step: str
    description: str
    recipe: dict[str, Any] | None
    top1: float | None = None
    drop_points: float | None = None
    adopted: bool = False
    skipped: str | None = None  # why the step was not tried
    seconds: float = 0.0


@dataclass
class FixResult:
    backend: str
    max_drop_points: float
    fp32_top1: float
    validation_samples: int
    steps: list[StepResult]
    recipe: Recipe  # the best recipe found (within budget when ``met``)
    drop_points: float
    met: bool
    model: Any = None  # the rewritten fused model the recipe builds from (not serialized)
    options: dict[str, Any] = field(default_factory=dict)  # backend options of the recipe (op names resolved)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "max_drop_points": self.max_drop_points, "fp32_top1": self.fp32_top1,
            "validation_samples": self.validation_samples, "met": self.met, "drop_points": self.drop_points,
            "recipe": asdict(self.recipe), "options": self.options, "steps": [asdict(s) for s in self.steps],
        }

    def check(self) -> None:
        """Raise QualityGateError (exit 3) when no recipe met the budget."""
        if not self.met:
            tried = ", ".join(s.step for s in self.steps if s.skipped is None)
            no_float = next((s.skipped for s in self.steps if s.step == "keep_fp" and s.skipped), None)
            advice = f"raise --max-drop ({no_float})" if no_float else "raise --max-drop or keep more layers in float"
            raise QualityGateError(
                f"{self.backend} int8 loses {self.drop_points:.2f} top-1 points after trying {tried}; "
                f"budget {self.max_drop_points:.2f}: {advice}"
            )


def layer_nodes(onnx_path: Path) -> dict[str, Any]:
    """PyTorch module name -> its ONNX Conv/Gemm node, matched through the weight initializer's name."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    nodes = {}
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in initializers:
            weight = node.input[1]
            if weight.endswith(".weight"):
                nodes[weight[: -len(".weight")]] = node
    return nodes


class _Trial:
    """Builds and scores recipes; caches exported ONNX per model rewrite."""

    def __init__(self, model: Any, backend: Any, calibration: Any, inputs: np.ndarray, labels: np.ndarray,
                 threads: int, work: Path, input_size: int) -> None:
        self.model, self.backend, self.calibration = model, backend, calibration
        self.inputs, self.labels, self.threads, self.work, self.input_size = inputs, labels, threads, work, input_size
        self.exports: dict[tuple[bool, ...], tuple[Any, Path]] = {}
        self.count = 0

    def rewritten(self, recipe: Recipe, per_channel: bool) -> tuple[Any, Path]:
        from deploykit.export import export_onnx
        from deploykit.quant.equalize import correct_bias, equalize

        # Bias correction depends on the weight scheme it corrects for.
        key = (recipe.zero_dead, recipe.equalize, recipe.bias_correction, per_channel and recipe.bias_correction)
        if key not in self.exports:
            import torch

            model = self.model
            if recipe.zero_dead:
                from deploykit.quant.dead_channels import zero_dead_weights

                model = zero_dead_weights(model, self.calibration.inputs).model
            if recipe.equalize:
                example = torch.from_numpy(np.ascontiguousarray(self.calibration.inputs[:8], dtype=np.float32))
                model, _ = equalize(model, example=example)
            if recipe.bias_correction:
                model, _ = correct_bias(model, self.calibration.inputs, per_channel=per_channel)
            path = self.work / f"model-{len(self.exports)}.onnx"
            export_onnx(model, path, input_size=self.input_size, batch=1)
            self.exports[key] = (model, path)
        return self.exports[key]

    def options(self, recipe: Recipe, knobs: Knobs, onnx_path: Path) -> dict[str, Any]:
        options = dict(recipe.options)
        if recipe.float_layers:
            nodes = layer_nodes(onnx_path)
            missing = [name for name in recipe.float_layers if name not in nodes]
            if missing:
                raise DeployError(f"layers {', '.join(missing)} have no Conv/Gemm node in the exported ONNX")
            options[knobs.float_layers] = ",".join(knobs.op_name(nodes[name]) for name in recipe.float_layers)
        return options

    def score(self, recipe: Recipe, knobs: Knobs) -> tuple[float, dict[str, Any]]:
        from deploykit.artifact import Artifact, write_record
        from deploykit.backends.base import BuildConfig, resolve_options

        _, onnx_path = self.rewritten(recipe, per_channel_weights(recipe, knobs))
        given = self.options(recipe, knobs, onnx_path)
        options = resolve_options(self.backend.name, self.backend.options, given, "int8")
        self.count += 1
        out = self.work / f"trial-{self.count}"
        out.mkdir()
        config = BuildConfig(precision="int8", threads=self.threads, calibration=self.calibration, options=options)
        facts = self.backend.build(onnx_path, out, config)
        write_record(out, target=self.backend.name, precision="int8", threads=self.threads, options=options,
                     backend=facts, built_by="deploykit.quant.max_drop (a trial; deleted after scoring)")
        runner = self.backend.load(Artifact.open(out), threads=self.threads)
        predicted = np.concatenate([runner(self.inputs[i : i + 1]).argmax(1) for i in range(len(self.inputs))])
        return float((predicted == self.labels).mean()), options


def max_drop_targets() -> list[str]:
    """The registered targets that declare max-drop switches."""
    from deploykit.backends.base import BACKENDS, get_backend

    return sorted(name for name in BACKENDS if get_backend(name).max_drop_knobs is not None)


def _fp32_top1(model: Any, inputs: np.ndarray, labels: np.ndarray) -> float:
    from deploykit.quant.fakequant import predict

    return float((predict(model, inputs).argmax(1).numpy() == labels).mean())


def fix_quantization(
    model: Any,
    *,
    backend: str,
    calibration: Any,
    validation_inputs: np.ndarray,
    validation_labels: np.ndarray,
    max_drop: float,
    base_options: dict[str, Any] | None = None,
    ranking: list[str] | None = None,
    max_fp_layers: int = DEFAULT_MAX_FP_LAYERS,
    threads: int = 2,
    input_size: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> FixResult:
    """Find the first recipe whose top-1 drop on the validation samples is <= ``max_drop`` points.

    ``model``: the fused PyTorch model (eval mode); ``calibration``: a ``CalibrationSet``
    (its ``inputs`` calibrate every build); ``ranking``: layer names worst first (default:
    computed with ``deploykit.quant.analyze``).
    """
    from deploykit.backends.base import get_backend, resolve_options

    if max_drop < 0:
        raise DeployError(f"--max-drop must be >= 0 points, not {max_drop}")
    if len(validation_inputs) == 0 or len(validation_inputs) != len(validation_labels):
        raise DeployError("max-drop needs labeled validation samples (one folder per class)")
    target = get_backend(backend)
    knobs = target.max_drop_knobs
    if knobs is None:
        raise DeployError(f"max-drop supports targets {', '.join(max_drop_targets())}, not {backend}")
    step_note = progress or (lambda text: None)
    size = input_size or int(validation_inputs.shape[-1])
    labels = np.asarray(validation_labels, dtype=np.int64)
    fp32 = _fp32_top1(model, validation_inputs, labels)
    steps: list[StepResult] = []

    with temp_dir("maxdrop") as tmp:
        trial = _Trial(model, target, calibration, np.asarray(validation_inputs, np.float32), labels, threads,
                       Path(tmp), size)
        best: Recipe = Recipe(options=resolve_options(backend, target.options, base_options or {}, "int8"))
        best_drop = float("inf")
        best_options: dict[str, Any] = {}

        def attempt(name: str, description: str, recipe: Recipe | None, skipped: str | None = None) -> bool:
            """Score ``recipe``; adopt it when it lowers the drop. True when within budget."""
            nonlocal best, best_drop, best_options
            if skipped is not None or recipe is None:
                steps.append(StepResult(name, description, None, skipped=skipped))
                return False
            step_note(f"max-drop: {description}")
            started = time.perf_counter()
            top1, options = trial.score(recipe, knobs)
            drop = 100.0 * (fp32 - top1)
            adopted = drop < best_drop
            if adopted:
                best, best_drop, best_options = recipe, drop, options
            steps.append(StepResult(name, description, asdict(recipe), top1, drop, adopted,
                                    seconds=round(time.perf_counter() - started, 2)))
            logger.info("max-drop %s: top-1 %.4f (drop %.2f points)%s", name, top1, drop,
                        "" if adopted else ", not kept")
            return drop <= max_drop

        done = attempt("baseline", "backend defaults", best)
        if not done:
            from deploykit.quant.dead_channels import dead_inputs

            dead = {k: int(v.sum()) for k, v in dead_inputs(model, calibration.inputs).items() if v.any()}
            done = attempt("zero_dead", f"zero the weights on dead input channels ({len(dead)} layers)",
                           best.with_(zero_dead=True) if dead else None,
                           skipped=None if dead else "no input channel is always zero on the calibration set")
        if not done:
            if knobs.per_channel is None:
                attempt("per_channel", "per-channel weights", None,
                        skipped=f"{backend} always quantizes weights per channel")
            elif per_channel_weights(best, knobs):
                attempt("per_channel", "per-channel weights", None, skipped="already on")
            else:
                option, value = knobs.per_channel
                done = attempt("per_channel", "per-channel weights",
                               best.with_(options={**best.options, option: value}))
        if not done:
            from deploykit.quant.equalize import conv_relu_conv_pairs

            pairs = conv_relu_conv_pairs(model)
            done = attempt("equalize", f"cross-layer equalization ({len(pairs)} conv pairs)",
                           best.with_(equalize=True) if pairs else None,
                           skipped=None if pairs else "no conv -> ReLU -> conv pairs")
        if not done:
            if knobs.bias_correction is not None:
                option, value = knobs.bias_correction
                recipe = best.with_(options={**best.options, option: value})
                description = f"bias correction ({backend}: {option}={value})"
            else:
                recipe, description = best.with_(bias_correction=True), "bias correction (PyTorch, empirical)"
            done = attempt("bias_correction", description, recipe)
        if not done:
            if knobs.float_layers is None or knobs.float_layers not in target.options:
                attempt("keep_fp", "worst layers in float", None,
                        skipped=knobs.why_no_float
                        or f"target {backend} has no option {knobs.float_layers!r} to keep layers in float")
            else:
                per_channel = per_channel_weights(best, knobs)
                rewritten, _ = trial.rewritten(best, per_channel)
                order = ranking or _rank(rewritten, calibration, validation_inputs, labels, per_channel)
                count = 1
                base = best
                while not done and count <= min(max_fp_layers, len(order)):
                    layers = order[:count]
                    done = attempt(f"keep_fp_{count}", f"{count} worst layer(s) in float: {', '.join(layers)}",
                                   base.with_(float_layers=list(layers)))
                    count *= 2
        final_model, _ = trial.rewritten(best, per_channel_weights(best, knobs))
    return FixResult(backend, max_drop, fp32, len(labels), steps, best, best_drop, best_drop <= max_drop,
                     final_model, best_options)


def per_channel_weights(recipe: Recipe, knobs: Knobs) -> bool:
    """Whether the backend quantizes weights per channel under ``recipe``."""
    return knobs.per_channel is None or recipe.options.get(knobs.per_channel[0]) == knobs.per_channel[1]


def _rank(model: Any, calibration: Any, inputs: np.ndarray, labels: np.ndarray, per_channel: bool) -> list[str]:
    from deploykit.quant.analyze import analyze

    return analyze(model, calibration.inputs, inputs, labels=labels, per_channel=per_channel).ranking
