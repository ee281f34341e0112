#!/usr/bin/env python3
"""Standalone runner of a deploykit bundle: self-test and classify images on the device.

Needs numpy and the bundle's runtime (onnxruntime, openvino, MNN, or tensorrt with
cuda-python); Pillow to read images. Not torch, not deploykit.

    python3 deploykit_runner.py --self-test [--latency] [--threads N]
    python3 deploykit_runner.py IMAGE... [--topk 5] [--json]
    python3 deploykit_runner.py --info

The self-test checks the sha256 of every file against manifest.json, the installed runtime's
version (TensorRT: must equal the building version; others: another major.minor warns), then
runs golden.npz's inputs and compares with its outputs within the manifest's tolerance.
Exit codes: 0 ok, 1 error (missing runtime, checksum, unreadable input), 3 outside tolerance.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

# Runtime telemetry off before any runtime is imported (deploykit.privacy: what each one writes).
for _key in ("ORT_DISABLE_TELEMETRY", "NNCF_CI"):
    if not os.environ.get(_key):
        os.environ[_key] = "1"
# OpenVINO initializes openvino-telemetry on import (a client id in ~/intel); without the
# package it uses a do-nothing stub. A None entry makes that import fail in this process.
sys.modules.setdefault("openvino_telemetry", None)

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent
MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
IGNORED_DIRS = ("__pycache__",)
EXACT_VERSION = ("tensorrt",)
RUNTIMES = {  # backend -> distributions whose installed version names the runtime
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "openvino": ("openvino",),
    "mnn": ("MNN",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
}


class RunnerError(Exception):
    exit_code = 1


class OutOfTolerance(RunnerError):
    exit_code = 3


# ---------------------------------------------------------------- bundle and integrity

def load_manifest(root: Path) -> dict:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise RunnerError(f"cannot read {MANIFEST}: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        raise RunnerError(f"{MANIFEST}: schema version {manifest.get('schema_version') if isinstance(manifest, dict) else '?'}"
                          f" is not {SCHEMA_VERSION}; use the runner shipped with this bundle")
    for key in ("backend", "precision", "model_file", "inputs", "outputs", "preprocessing", "labels", "files",
                "tolerance", "golden", "runtime", "threads"):
        if key not in manifest:
            raise RunnerError(f"{MANIFEST} lacks {key!r}")
    if manifest["backend"] not in LOADERS:
        raise RunnerError(f"this runner does not know backend {manifest['backend']!r}")
    return manifest


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_files(root: Path, manifest: dict) -> int:
    for rel, expected in sorted(manifest["files"].items()):
        path = root / rel
        if ".." in rel.split("/") or rel.startswith("/") or path.is_symlink() or not path.is_file():
            raise RunnerError(f"{rel} is missing or not a regular file")
        if sha256(path) != expected:
            raise RunnerError(f"checksum mismatch: {rel}: the file was changed or corrupted")
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in IGNORED_DIRS for part in rel.parts):
            continue
        if path.is_symlink() or (path.is_file() and rel.as_posix() not in manifest["files"]
                                 and rel.as_posix() != MANIFEST):
            raise RunnerError(f"{rel.as_posix()} is in the bundle but not listed in {MANIFEST}")
    return len(manifest["files"])


def installed_version(backend: str, module) -> str | None:
    from importlib import metadata

    for dist in RUNTIMES[backend]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return getattr(module, "__version__", None)  # apt-installed TensorRT has no pip metadata


def check_version(manifest: dict, installed: str | None) -> list[str]:
    built = manifest["runtime"].get("version")
    backend = manifest["backend"]
    if built is None or installed is None or built == installed:
        return []
    if backend in EXACT_VERSION:
        raise RunnerError(f"bundle built with {backend} {built}; this device has {installed}. An engine loads only "
                          "in the version that built it: rebuild and package on this device")
    def major_minor(v: str):
        return tuple(re.split(r"[.+-]", v)[:2])
    if major_minor(built) != major_minor(installed):
        return [f"bundle built with {backend} {built}; this device has {installed}: the self-test decides"]
    return []


# ---------------------------------------------------------------- runtimes

@contextlib.contextmanager
def quiet_stdout():
    """Drop what a runtime's C code prints on stdout (MNN prints a CPU banner)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    import ctypes

                    ctypes.CDLL(None).fflush(None)
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _missing(module: str, err: Exception) -> RunnerError:
    return RunnerError(f"this bundle needs the {module} runtime: pip install {module} ({err})")


def load_onnxruntime(path: Path, manifest: dict, threads: int):
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise _missing("onnxruntime", err) from err

    def open_session(config: dict):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        for key, value in config.items():
            opts.add_session_config_entry(key, value)
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    config = manifest["runtime"].get("config", {})  # the settings the build was verified with
    try:
        session = open_session(config)
    except Exception as err:  # ORT's u8s8 -> u8u8 transformer (most x86 CPUs) fails on some models
        if not config:
            raise
        print(f"warning: onnxruntime cannot apply {', '.join(config)} here ({(str(err).strip().splitlines() or [type(err).__name__])[0]}); "
              "running without: the self-test decides", file=sys.stderr)
        session = open_session({})
    name = session.get_inputs()[0].name
    return (lambda x: session.run(None, {name: x})[0]), installed_version("onnxruntime", ort)


def load_openvino(path: Path, manifest: dict, threads: int):
    try:
        import openvino as ov
    except ImportError as err:
        raise _missing("openvino", err) from err
    # The build's arithmetic (manifest runtime.config: bf16/f16 where it was verified so; bundles made
    # before it was recorded: f32). Without units for it, OpenVINO computes in f32: the self-test decides.
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "f32", **manifest["runtime"].get("config", {})}
    request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()

    def run(x):
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()

    return run, installed_version("openvino", ov)


def load_mnn(path: Path, manifest: dict, threads: int):
    try:
        with quiet_stdout():
            import MNN  # inference only; MNN.tools (which installs a usage-logging SDK) is never imported
    except ImportError as err:
        raise _missing("MNN", err) from err
    mode = "low" if manifest["precision"] == "fp16" else "high"
    with quiet_stdout():
        runtime = MNN.nn.create_runtime_manager(({"backend": "CPU", "numThread": threads, "precision": mode},))
        module = MNN.nn.load_module_from_file(str(path), [manifest["inputs"][0]["name"]],
                                              [manifest["outputs"][0]["name"]], runtime_manager=runtime)
    if module is None:
        raise RunnerError(f"MNN cannot load {path.name}")
    expr = MNN.expr

    def run(x):
        out = module.forward(expr.const(x, list(x.shape), expr.NCHW))
        out = expr.convert(out[0] if isinstance(out, list) else out, expr.NCHW)
        return np.array(out.read(), dtype=np.float32, copy=True)

    return run, installed_version("mnn", MNN)


def load_tensorrt(path: Path, manifest: dict, threads: int):
    """An engine on CUDA device 0 through cuda-python; written to TensorRT 10/11's API, not run by deploykit."""
    try:
        import tensorrt as trt
    except ImportError as err:
        raise _missing("tensorrt", err) from err
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as err:
            raise _missing("cuda-python", err) from err

    def call(result):
        result = result if isinstance(result, tuple) else (result,)
        if result[0] != cudart.cudaError_t.cudaSuccess:
            raise RunnerError(f"CUDA error {result[0]}")
        return result[1] if len(result) == 2 else None

    installed = installed_version("tensorrt", trt)
    check_version(manifest, installed)  # before deserializing: another version's engine is rejected anyway
    wanted = (manifest["runtime"].get("device") or {}).get("compute_capability")
    props = call(cudart.cudaGetDeviceProperties(0))
    if wanted and wanted != f"{props.major}.{props.minor}":
        raise RunnerError(f"engine built for compute capability {wanted}; this GPU has {props.major}.{props.minor}")
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise RunnerError(f"TensorRT cannot load {path.name}")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    out = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    stream = call(cudart.cudaStreamCreate())
    buffers: dict = {}

    def run(x):
        x = np.ascontiguousarray(x, dtype=trt.nptype(engine.get_tensor_dtype(inp)))
        context.set_input_shape(inp, x.shape)
        y = np.empty(tuple(context.get_tensor_shape(out)), dtype=trt.nptype(engine.get_tensor_dtype(out)))
        if x.shape not in buffers:
            buffers[x.shape] = (call(cudart.cudaMalloc(x.nbytes)), call(cudart.cudaMalloc(y.nbytes)))
        d_in, d_out = buffers[x.shape]
        kind = cudart.cudaMemcpyKind
        call(cudart.cudaMemcpy(d_in, x.ctypes.data, x.nbytes, kind.cudaMemcpyHostToDevice))
        context.set_tensor_address(inp, d_in)
        context.set_tensor_address(out, d_out)
        if not context.execute_async_v3(stream):
            raise RunnerError("TensorRT execution failed")
        call(cudart.cudaStreamSynchronize(stream))
        call(cudart.cudaMemcpy(y.ctypes.data, d_out, y.nbytes, kind.cudaMemcpyDeviceToHost))
        return y.astype(np.float32)

    return run, installed


LOADERS = {"onnxruntime": load_onnxruntime, "openvino": load_openvino, "mnn": load_mnn, "tensorrt": load_tensorrt}


class Model:
    """The bundle's model: NCHW float32 batch in, outputs out, in chunks of the model's fixed batch."""

    def __init__(self, root: Path, manifest: dict, threads: int) -> None:
        self.run, self.version = LOADERS[manifest["backend"]](root / manifest["model_file"], manifest, threads)
        first = manifest["inputs"][0]["shape"][0] if manifest["inputs"][0]["shape"] else None
        self.batch = first if isinstance(first, int) and first > 0 else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.batch is None or len(x) == self.batch:
            return np.asarray(self.run(x), dtype=np.float32)
        if len(x) % self.batch:
            raise RunnerError(f"this model takes batches of {self.batch}; got {len(x)} inputs")
        return np.concatenate([np.asarray(self.run(x[i:i + self.batch]), dtype=np.float32)
                               for i in range(0, len(x), self.batch)])


# ---------------------------------------------------------------- preprocessing, comparing, timing

def preprocess(path: Path, spec: dict) -> np.ndarray:
    """One image file -> the model's input tensor; the same steps as deploykit's Preprocessing.apply."""
    try:
        from PIL import Image
    except ImportError as err:
        raise _missing("Pillow", err) from err
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, Image.DecompressionBombError) as err:
        raise RunnerError(f"cannot read image {path}: {err}") from err
    size, resize = spec["size"], spec.get("resize")
    if resize is not None:
        w, h = image.size
        scale = resize / min(w, h)
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                             resample[spec.get("interpolation", "bilinear")])
    w, h = image.size
    if w < size or h < size:
        raise RunnerError(f"{path} is {w}x{h}, smaller than the {size}x{size} input")
    left, top = (w - size) // 2, (h - size) // 2
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    if spec.get("channel_order", "RGB") == "BGR":
        pixels = pixels[..., ::-1]
    if spec.get("layout", "NCHW") == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def compare(expected: np.ndarray, actual: np.ndarray) -> dict:
    a = expected.reshape(len(expected), -1).astype(np.float64)
    b = actual.reshape(len(actual), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = (a * b).sum(axis=1) / np.where(norms > 0, norms, 1.0)
    cos = np.where((np.abs(a).sum(1) == 0) & (np.abs(b).sum(1) == 0), 1.0, cos)
    finite = bool(np.isfinite(b).all())
    return {
        "samples": len(a),
        "cosine_min": float(cos.min()) if finite else float("nan"),
        "cosine_mean": float(cos.mean()) if finite else float("nan"),
        "max_rel_error": float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)) if finite else float("inf"),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
    }


def judge(figures: dict, tolerance: dict) -> list[str]:
    checks = [("min_cosine", "cosine_min", ">="), ("min_mean_cosine", "cosine_mean", ">="),
              ("max_rel_error", "max_rel_error", "<="), ("min_top1_agreement", "top1_agreement", ">=")]
    problems = []
    for bound_key, value_key, op in checks:
        bound, value = tolerance.get(bound_key), figures[value_key]
        if bound is not None and not (value >= bound if op == ">=" else value <= bound):
            problems.append(f"{value_key} {value:.6g} (want {op} {bound:g})")
    return problems


# The fields deploykit's device fingerprint names the core design with (deploykit.device.CPU_ID_FIELDS).
CPU_ID_FIELDS = {"vendor_id": "{}", "cpu family": "family {}", "model": "model {}",
                 "CPU implementer": "implementer {}", "CPU part": "part {}"}


def this_cpu() -> dict:
    """{"cpu", "cpu_id", "arch"} as deploykit records them (the first CPU of /proc/cpuinfo)."""
    name, ident = None, {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in ("model name", "Model", "Hardware", "cpu model") and value and name is None:
                name = value
            if key in CPU_ID_FIELDS and value and key not in ident:
                ident[key] = CPU_ID_FIELDS[key].format(value)
    return {"cpu": name or platform.processor() or platform.machine(),
            "cpu_id": " ".join(ident[k] for k in CPU_ID_FIELDS if k in ident) or None, "arch": platform.machine()}


def same_cpu(a: dict, b: dict) -> bool:
    """One CPU design (a band recorded without cpu_id: by name and architecture)."""
    same = (a.get("cpu"), a.get("arch")) == (b.get("cpu"), b.get("arch"))
    return same and (not a.get("cpu_id") or not b.get("cpu_id") or a["cpu_id"] == b["cpu_id"])


def describe_cpu(device: dict) -> str:
    name = device.get("cpu") or "unknown CPU"
    return f"{name} ({device['cpu_id']})" if device.get("cpu_id") else name


def measure_latency(model: Model, sample: np.ndarray, warmup: int = 10, iterations: int = 50) -> dict:
    for _ in range(warmup):
        model(sample)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        model(sample)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)), "iterations": iterations}


# ---------------------------------------------------------------- commands

def self_test(root: Path, manifest: dict, threads: int, latency: bool) -> dict:
    checked = check_files(root, manifest)
    model = Model(root, manifest, threads)
    notes = check_version(manifest, model.version)
    with np.load(root / manifest["golden"]["file"], allow_pickle=False) as golden:
        inputs, expected = golden["inputs"], golden["outputs"]
    actual = model(inputs)
    if actual.shape != expected.shape:
        raise OutOfTolerance(f"golden outputs of shape {actual.shape}; recorded {expected.shape}")
    figures = compare(expected, actual)
    problems = judge(figures, manifest["tolerance"])
    result = {"files_checked": checked, "runtime": f"{manifest['backend']} {model.version}", "golden": figures,
              "warnings": notes, "passed": not problems, "problems": problems}
    if latency:
        band = manifest.get("latency")
        measured = measure_latency(model, inputs[: (band or {}).get("batch", 1)])
        result["latency"] = measured
        low, high = band["band_ms"] if band else (0.0, 0.0)
        where = (band or {}).get("device") or {}
        if band is None:
            notes.append("no latency band recorded: measured, not judged")
        elif not same_cpu(where, this_cpu()):
            notes.append(f"latency band recorded on {describe_cpu(where)} ({where.get('arch')}); "
                         f"this is {describe_cpu(this_cpu())} ({platform.machine()}): measured, not judged")
        elif measured["median_ms"] > high:
            result["passed"] = False
            result["problems"].append(f"latency median {measured['median_ms']:.3f} ms above the band "
                                      f"{low:.3f}-{high:.3f} ms recorded on this device")
    return result


def classify(root: Path, manifest: dict, images: list[str], topk: int, threads: int) -> list[dict]:
    check_files(root, manifest)
    model = Model(root, manifest, threads)
    for note in check_version(manifest, model.version):
        print(f"warning: {note}", file=sys.stderr)
    inputs = np.stack([preprocess(Path(p), manifest["preprocessing"]) for p in images])
    logits = model(inputs).reshape(len(images), -1).astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = manifest["labels"]
    k = min(topk, probs.shape[1])
    return [{"image": p, "top": [[labels[i], float(row[i])] for i in np.argsort(-row, kind="stable")[:k]]}
            for p, row in zip(images, probs)]


def bound_threads(requested: int) -> int:
    """At most the CPUs this process may run on (more only oversubscribes them)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested < 1:
        raise RunnerError(f"--threads {requested}: must be at least 1")
    if requested > usable:
        print(f"warning: --threads {requested} is more than the {usable} CPUs this process may use; using {usable}",
              file=sys.stderr)
        return usable
    return requested


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="example: python3 deploykit_runner.py --self-test --latency")
    parser.add_argument("images", nargs="*", help="images to classify")
    parser.add_argument("--self-test", action="store_true", help="checksums, runtime version, golden outputs")
    parser.add_argument("--latency", action="store_true", help="with --self-test: median latency of one batch")
    parser.add_argument("--info", action="store_true", help="print what the bundle holds")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="runtime threads (default: the manifest's)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--bundle", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest(args.bundle)
        threads = bound_threads(args.threads or manifest["threads"])
        if args.info:
            keys = ("name", "model", "target", "backend", "precision", "inputs", "outputs", "labels", "runtime")
            print(json.dumps({k: manifest.get(k) for k in keys}, indent=2))
        elif args.self_test:
            result = self_test(args.bundle, manifest, threads, args.latency)
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                g = result["golden"]
                print(f"{result['files_checked']} files: checksums ok; {result['runtime']}")
                print(f"golden: {g['samples']} inputs, cosine min {g['cosine_min']:.6f}, "
                      f"max rel error {g['max_rel_error']:.3g}, top-1 agreement {g['top1_agreement']:.3f}")
                if "latency" in result:
                    print(f"latency: median {result['latency']['median_ms']:.3f} ms, "
                          f"p90 {result['latency']['p90_ms']:.3f} ms")
                for note in result["warnings"]:
                    print(f"warning: {note}", file=sys.stderr)
                print("self-test passed" if result["passed"] else "self-test FAILED: " + "; ".join(result["problems"]))
            if not result["passed"]:
                return OutOfTolerance.exit_code
        elif args.images:
            results = classify(args.bundle, manifest, args.images, args.topk, threads)
            if args.json:
                print(json.dumps(results, indent=2))
            for item in [] if args.json else results:
                print(item["image"])
                for label, prob in item["top"]:
                    print(f"  {prob:.4f}  {label}")
        else:
            parser.print_help()
            return 2
    except RunnerError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:  # a runtime's own exception: one line, not a traceback on a device console
        print(f"error: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
