"""The build pipeline: MODEL -> fuse -> export -> backend build -> verify -> artifact directory.

Everything is written into a temporary directory beside the output and renamed into place
only when verification passes, so a failed build leaves no partial artifact and any previous
artifact untouched. ``build.json`` records what was built, from what, with which tools and
options, and how close the artifact is to the reference.

build.json is the typed record of ``deploykit.artifact`` (its docstring lists the fields).
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from warnings import catch_warnings, simplefilter, warn_explicit

from deploykit.artifact import Artifact, ArtifactRecord, write_record
from deploykit.backends.base import (
    DEFAULT_THREADS, BuildConfig, Runner, check_precision, get_backend, resolve_options,
)
from deploykit.errors import DeployError, QualityGateError, UsageError
from deploykit.files import atomic_dir, check_writable, sha256_file, temp_dir

logger = logging.getLogger(__name__)

DEFAULT_VERIFY_SAMPLES = 64


@dataclass(frozen=True)
class BuildRequest:
    model: str  # zoo name, file.py:factory, checkpoint, or .onnx
    target: str  # backend or profile name
    precision: str | None = None  # None: the profile's, else fp32
    calib: str | None = None  # recipe name/file or data path; None: synthetic fallback
    calib_recipe: str | None = None  # preprocessing for --calib PATH
    calib_samples: int | None = None
    out: Path | None = None
    threads: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    force: bool = False
    num_classes: int | None = None
    cifar: bool | None = None
    input_size: int | None = None  # zoo models: input height/width (None: the model's)
    verify_samples: int = DEFAULT_VERIFY_SAMPLES
    seed: int | None = None
    max_drop: float | None = None  # int8: largest top-1 drop in points (1.0 = one point)
    weights: str | None = None  # checkpoint that fills the model (or "pretrained" for timm/torchvision)
    accept_partial: bool = False  # accept a fusion that left BatchNorm / branches unfolded
    int8_fix: str | None = None  # int8: a named fix (deploykit.quant.fixes.INT8_FIXES), no budget needed
    fuse: bool = True  # .onnx input: re-parameterize its graph (Conv+BN, summed parallel branches) first


@dataclass(frozen=True)
class BuildResult:
    path: Path
    record: ArtifactRecord

    @property
    def meta(self) -> dict[str, Any]:
        """The record as written to build.json (plain JSON types)."""
        return self.record.model_dump(mode="json")

    @property
    def warnings(self) -> list[str]:
        return list(self.record.warnings)


@dataclass
class _Source:
    """The model side of a build: the ONNX to convert and the reference to verify against."""

    onnx_path: Path
    input_size: int
    reference: Callable[[], Runner]  # made on use: the target's converter speaks first about odd ops
    reference_name: str
    model_meta: dict[str, Any]
    export_meta: dict[str, Any]
    torch_model: Any = None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "model"


def default_out(model: str, target: str, precision: str) -> Path:
    stem = Path(model.split(".py:")[0]).stem if (".py:" in model or "/" in model or "." in model) else model
    if ".py:" in model:
        stem = f"{stem}-{model.rsplit(':', 1)[1]}"
    return Path("build") / f"{_slug(stem)}-{target}-{precision}"


def _from_onnx(path: Path, threads: int, work: Path, step: Callable[[str], None], fuse: bool = True) -> _Source:
    from deploykit.backends.onnxruntime import OnnxRuntimeRunner
    from deploykit.onnxio import check_image_model

    size = check_image_model(path)
    fusion, built_from = None, path
    if fuse:
        from deploykit.fuse.onnx_graph import fuse_onnx_file

        step("re-parameterizing the ONNX graph")
        report = fuse_onnx_file(path, work / "model-fused.onnx", input_size=size,
                                runner=lambda file: OnnxRuntimeRunner(file, threads=threads))
        if report is not None:
            logger.info("%s", report.summary())
            fusion, built_from = report.to_dict(), work / "model-fused.onnx"
    return _Source(
        onnx_path=built_from, input_size=size,
        reference=lambda: OnnxRuntimeRunner(path, threads=threads),
        reference_name="onnxruntime fp32 on the original ONNX",
        model_meta={"name": path.stem, "source": "onnx", "spec": str(path),
                    "form": "deploy" if fusion is None else "train", "fusion": fusion},
        export_meta={"opset": None, "sha256": sha256_file(path), "report": None},
    )


def unfused_branches_note(path: Path, fused: bool = True, name: str | None = None) -> list[str]:
    """A warning when the ONNX a build runs still sums parallel conv branches (RepVGG-style blocks)."""
    from deploykit.onnxio import summed_branches

    blocks = summed_branches(path)
    if not blocks:
        return []
    why = ("deploykit could not re-parameterize them on the ONNX graph (kernels not centre-aligned, or one kernel "
           "would cost more than the branches); give deploykit the PyTorch model to fuse them" if fused
           else "built with --no-fuse; without it deploykit re-parameterizes them")
    return [f"{name or path.name} sums parallel convolution branches in {len(blocks)} blocks (RepVGG-style, not "
            f"re-parameterized): every target runs them as they are; {why}"]


def _from_torch(request: BuildRequest, work: Path, threads: int, step: Callable[[str], None],
                batch: int | str = 1) -> _Source:
    from deploykit.backends.torch_cpu import TorchRunner
    from deploykit.export import export_onnx
    from deploykit.fuse import reparameterize
    from deploykit.loading import check_input, load_model

    step("loading the model")
    loaded = load_model(request.model, num_classes=request.num_classes, cifar=request.cifar,
                        input_size=request.input_size, weights=request.weights)
    check_input(loaded)
    size = loaded.input_size
    fusion = None
    fused = loaded.model
    if loaded.form != "deploy":
        step("fusing (re-parameterizing)")
        result = reparameterize(loaded.model, input_shape=(2, 3, size, size), accept_partial=request.accept_partial)
        fused, fusion = result.model, result.certificate.to_dict() if result.certificate is not None else None
    step("exporting to ONNX")
    onnx_path = work / "model.onnx"
    report = export_onnx(fused, onnx_path, input_size=size, batch=batch)
    return _Source(
        onnx_path=onnx_path, input_size=size,
        reference=lambda: TorchRunner(loaded.model, threads=threads),
        reference_name="torch eager (the model as loaded)",
        model_meta={"name": loaded.name, "source": loaded.source, "spec": loaded.spec or request.model,
                    "form": loaded.form, "fusion": fusion},
        export_meta={"opset": report.opset, "sha256": sha256_file(onnx_path), "report": report.to_dict()},
        torch_model=fused,
    )


def _calibration(request: BuildRequest, precision: str, input_size: int, recipe: str | None,
                 warnings: list[str]) -> Any:
    from deploykit.calib import MIN_RECOMMENDED_SAMPLES, load_calibration

    from deploykit.calib.preprocess import UpscaleWarning

    needs_data = precision == "int8"
    with catch_warnings(record=True) as caught:
        simplefilter("always", UpscaleWarning)
        calib = load_calibration(
            request.calib if (needs_data or request.calib) else None,
            input_size=input_size,
            num_samples=request.calib_samples if needs_data else 1,
            num_verify=request.verify_samples,
            seed=request.seed,
            recipe=recipe,
        )
    warnings.extend(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UpscaleWarning)))
    for w in caught:  # everything else as if not caught
        if not issubclass(w.category, UpscaleWarning):
            warn_explicit(w.message, w.category, w.filename, w.lineno)
    if needs_data and calib.synthetic:
        warnings.append(
            "INT8 calibrated on synthetic data (seeded random tensors): the artifact runs int8 kernels, "
            "but its accuracy needs real data: pass --calib DIR"
        )
    elif needs_data and len(calib) < MIN_RECOMMENDED_SAMPLES:
        warnings.append(f"INT8 calibrated on {len(calib)} samples; {MIN_RECOMMENDED_SAMPLES}+ give stabler ranges")
    return calib


def _verify(source: _Source, runner: Runner, calib: Any, target: str, precision: str,
            warnings: list[str]) -> dict[str, Any]:
    """Figures of the artifact against the reference on the held-out inputs; gate fp32/fp16."""
    from deploykit.verify import TOLERANCES, compare, judge

    comparison = compare(source.reference()(calib.held_out), runner(calib.held_out))
    tolerance = TOLERANCES[precision]
    problems = judge(comparison, tolerance)
    if problems and tolerance.gate:
        raise QualityGateError(
            f"{target} {precision} artifact differs from the reference: {'; '.join(problems)}; nothing written"
        )
    if problems:
        warnings.append(f"{precision} artifact below the expected agreement: {'; '.join(problems)}")
    return {
        "reference": source.reference_name,
        "inputs": f"held-out samples of {calib.source}",
        **comparison.to_dict(),
        "tolerance": {"precision": precision, **tolerance.to_dict()},
        "passed": not problems,
        "problems": problems,
    }


def _fix_quantization(request: BuildRequest, target: str, source: _Source, calib: Any, options: dict[str, Any],
                      threads: int, work: Path, step: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """--max-drop: apply what the diagnosis suggests until the top-1 drop is within budget.

    Scored on the labeled held-out samples. When the chosen recipe rewrote weights (cross-layer
    equalization, bias correction) the rewritten model is exported and built instead.
    """
    from deploykit.export import export_onnx
    from deploykit.quant.max_drop import fix_quantization

    if source.torch_model is None:
        raise DeployError("--max-drop needs a PyTorch model (zoo name or checkpoint), not an .onnx file")
    if calib.held_out_labels is None:
        raise DeployError("--max-drop needs labeled data to score accuracy: --calib DIR with one folder per class")
    fix = fix_quantization(
        source.torch_model, backend=target, calibration=calib, validation_inputs=calib.held_out,
        validation_labels=calib.held_out_labels, max_drop=request.max_drop, base_options=options,
        threads=threads, input_size=source.input_size, progress=step,
    )
    fix.check()  # QualityGateError (exit 3): nothing is written
    if fix.model is not None and fix.model is not source.torch_model:
        fixed = work / "model-fixed.onnx"
        export_onnx(fix.model, fixed, input_size=source.input_size, batch=1)
        source.onnx_path = fixed
    return fix.options, fix.to_dict()


def _int8_fix(request: BuildRequest, target: str, source: _Source, calib: Any, options: dict[str, Any], work: Path,
              step: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """--int8-fix NAME: rewrite the fused model as the named fix says, re-export, add its backend options."""
    from deploykit.export import export_onnx
    from deploykit.quant.fixes import apply_int8_fix

    if source.torch_model is None:
        raise DeployError("--int8-fix needs a PyTorch model (zoo name or checkpoint), not an .onnx file")
    if getattr(calib, "synthetic", False):
        raise DeployError("--int8-fix finds always-zero channels on real calibration data: pass --calib PATH")
    step(f"int8 fix {request.int8_fix}")
    fix = apply_int8_fix(request.int8_fix, source.torch_model, calib, backend=target)
    fixed = work / "model-int8-fix.onnx"
    export_onnx(fix.model, fixed, input_size=source.input_size, batch=1)
    source.onnx_path, source.torch_model = fixed, fix.model
    return {**options, **fix.options}, fix.to_dict()


def build(request: BuildRequest, *, progress: Callable[[str], None] | None = None) -> BuildResult:
    """Run the pipeline for ``request``; ``progress(step)`` is called as each step starts."""
    from deploykit.device import device_fingerprint
    from deploykit.onnxio import onnx_io
    from deploykit.device import bound_threads
    from deploykit.profiles import resolve_target

    step = progress or (lambda text: None)
    started = time.perf_counter()
    profile = resolve_target(request.target)
    backend = get_backend(profile.target)
    precision = request.precision or profile.precision or "fp32"
    check_precision(backend, precision)
    given = {**profile.options, **request.options}
    if request.int8_fix is not None and precision != "int8":
        raise UsageError("--int8-fix applies to int8 builds")
    if request.max_drop is not None:
        if precision != "int8":
            raise UsageError("--max-drop applies to int8 builds")
        if backend.native_max_drop_option:  # the backend's own accuracy-controlled search (same unit: points)
            given[backend.native_max_drop_option] = request.max_drop
    options = resolve_options(backend.name, backend.options, given, precision)
    if not backend.can_build(options):
        raise DeployError(backend.missing_reason())
    threads = bound_threads(request.threads or profile.threads or DEFAULT_THREADS)
    from deploykit.onnxio import is_onnx_model

    is_onnx = is_onnx_model(request.model)
    if is_onnx and backend.builds_from_module:
        raise DeployError(f"target {backend.name} builds from a PyTorch model, not from an .onnx file")
    out = Path(request.out) if request.out else default_out(request.model, backend.name, precision)
    check_writable(out, force=request.force, kind="dir")
    warnings: list[str] = []

    with temp_dir("build") as work:
        if is_onnx:
            step("checking the ONNX model")
            source = _from_onnx(Path(request.model), threads, Path(work), step, fuse=request.fuse)
            warnings.extend(unfused_branches_note(source.onnx_path, fused=request.fuse, name=Path(request.model).name))
        else:
            source = _from_torch(request, Path(work), threads, step, backend.export_batch)
        step("loading calibration data" if precision == "int8" else "loading verification inputs")
        calib = _calibration(request, precision, source.input_size, request.calib_recipe or profile.calib_recipe,
                             warnings)
        int8_fix_meta = None
        if request.int8_fix is not None:
            options, int8_fix_meta = _int8_fix(request, backend.name, source, calib, options, Path(work), step)
            options = resolve_options(backend.name, backend.options, options, precision)
        max_drop_meta = None
        if request.max_drop is not None and not backend.native_max_drop_option:
            options, max_drop_meta = _fix_quantization(request, backend.name, source, calib, options, threads,
                                                       Path(work), step)
        config = BuildConfig(precision=precision, threads=threads,
                             calibration=calib if precision == "int8" else None,
                             options=options, source_model=source.torch_model)
        with atomic_dir(out, force=request.force) as tmp:
            step(f"building {backend.name} {precision}")
            facts = backend.build(source.onnx_path, tmp, config)
            step("verifying against the reference")
            if facts.get("emit_only"):
                # No engine here: verify the ONNX the engine will be built from, on ONNX Runtime.
                from deploykit.backends.onnxruntime import OnnxRuntimeRunner

                runner = OnnxRuntimeRunner(tmp / facts["onnx_file"], threads=threads)
            else:
                runner = backend.load(Artifact.staged(tmp, backend.name, precision, facts), threads=threads)
            verification = _verify(source, runner, calib, backend.name, precision, warnings)
            if facts.get("emit_only"):
                verification["reference"] += "; artifact: emitted ONNX on onnxruntime, no engine built"
            record = write_record(
                tmp,
                target=backend.name,
                profile=None if profile.name == backend.name else profile.name,
                precision=precision,
                threads=threads,
                options=options,
                model=source.model_meta,
                export=source.export_meta,
                **onnx_io(source.onnx_path),
                preprocessing=calib.preprocessing.to_dict(),
                calibration=calib.summary() if precision == "int8" else None,
                # Class names (index = label) when the data is a labeled folder tree.
                classes=list(calib.classes) if calib.classes else None,
                max_drop=max_drop_meta,
                int8_fix=int8_fix_meta,
                backend=facts,
                verification=verification,
                device=device_fingerprint(),
                warnings=warnings,
                build_seconds=round(time.perf_counter() - started, 3),
            )
    for text in warnings:
        logger.warning(text)
    return BuildResult(out, record)
