"""Building and running TensorRT engines: the part of the target that needs TensorRT and a GPU.

NOT EXECUTED: nothing in this module has been run by deploykit's authors or tests. TensorRT
could not be installed where it was written (its libraries come only from NVIDIA's index)
and there was no GPU. It follows the TensorRT 10/11 Python API documentation:

- build: ``Builder``, ``create_network`` with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
  (required opt-in on 10.x; accepted and ignored on 11.x, where every network is strongly
  typed), ``OnnxParser.parse_from_file``, ``IBuilderConfig.set_memory_pool_limit``
  (workspace), ``builder_optimization_level``, ``create_optimization_profile`` / ``set_shape``,
  ``create_timing_cache`` / ``set_timing_cache`` / ``get_timing_cache().serialize()``,
  ``build_serialized_network``;
- run: ``Runtime.deserialize_cuda_engine``, the name-based I/O tensor API (``num_io_tensors``,
  ``get_tensor_name``, ``get_tensor_mode``, ``get_tensor_dtype``), ``set_input_shape``,
  ``set_tensor_address`` and ``execute_async_v3`` on a CUDA stream.

Device buffers are PyTorch CUDA tensors; GPU compute time is measured with CUDA events
around ``execute_async_v3`` only, host-to-device and device-to-host copies separately.

TensorRT treats its logger as a process-wide singleton ("multiple instances of IRuntime
and/or IBuilder must all use the same logger", ``ILogger``'s documentation), so one
forwarding logger serves every Builder and Runtime here, and each call that can fail
collects the errors logged while it runs (:func:`captured_errors`). Those two pieces, the
timing-cache handling and the input-shape checks are exercised by deploykit's tests with a
stand-in ``tensorrt`` module (no TensorRT call is made); the rest has not run.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import DeployError
from deploykit.files import atomic_file

logger = logging.getLogger(__name__)


_LOCK = threading.Lock()
_PROCESS_LOGGER: Any = None  # the one TensorRT logger of this process, created on first use
_CAPTURES: dict[int, list[list[str]]] = {}  # thread id -> the error lists of its open captured_errors()


def _record_error(message: str) -> None:
    """Hand an error to the calling thread's open captures, else (a TensorRT worker thread) to all."""
    with _LOCK:
        targets = _CAPTURES.get(threading.get_ident()) or [c for lists in _CAPTURES.values() for c in lists]
        for errors in targets:
            errors.append(message)


def process_logger() -> Any:
    """The process-wide TensorRT logger: forwards to :mod:`logging`, errors to :func:`captured_errors`."""
    global _PROCESS_LOGGER
    import tensorrt as trt

    with _LOCK:
        if _PROCESS_LOGGER is not None:
            return _PROCESS_LOGGER

        class Forward(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, msg: str) -> None:
                level = trt.ILogger.Severity
                if severity in (level.INTERNAL_ERROR, level.ERROR):
                    _record_error(msg)
                    logger.error("TensorRT: %s", msg)
                elif severity == level.WARNING:
                    logger.warning("TensorRT: %s", msg)
                elif severity == level.INFO:
                    logger.debug("TensorRT: %s", msg)

        _PROCESS_LOGGER = Forward()  # kept for the life of the process: TensorRT may log until exit
        return _PROCESS_LOGGER


@contextlib.contextmanager
def captured_errors() -> Iterator[list[str]]:
    """The TensorRT errors logged while the block runs (on this thread, or on TensorRT's own)."""
    errors: list[str] = []
    ident = threading.get_ident()
    with _LOCK:
        _CAPTURES.setdefault(ident, []).append(errors)
    try:
        yield errors
    finally:
        with _LOCK:
            _CAPTURES[ident].remove(errors)
            if not _CAPTURES[ident]:
                del _CAPTURES[ident]


def _reason(errors: list[str], default: str) -> str:
    text = str(errors[-1]).strip() if errors else ""
    return text.splitlines()[0] if text else default


def attach_timing_cache(config: Any, path: Path) -> str:
    """Give ``config`` the timing cache in ``path``; returns reused, new, rejected or unreadable.

    A cache from another GPU or TensorRT is refused by ``set_timing_cache`` (returns False;
    ``ignore_mismatch=False``, its timings would not apply) and a fresh one is used instead,
    as for a file TensorRT cannot parse (``create_timing_cache`` returns None or raises).
    Either way the build goes on; only an unreadable file is then left as it was.
    """
    previous = path.read_bytes() if path.is_file() else b""
    status = "reused" if previous else "new"
    cache = None
    if previous:
        try:
            cache = config.create_timing_cache(previous)
        except Exception as err:  # the bindings raise on some corrupt buffers, return None on others
            logger.debug("create_timing_cache(%s): %s", path, err)
        if cache is None:
            logger.warning("timing cache %s is not a TensorRT timing cache (corrupt or another file); "
                           "building without it and leaving the file as it is", path)
            status = "unreadable"
        elif not config.set_timing_cache(cache, ignore_mismatch=False):
            logger.warning("timing cache %s is from another GPU or TensorRT; starting a new one", path)
            status, cache = "rejected", None
        else:
            return status
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, ignore_mismatch=False):
        logger.warning("TensorRT could not create a timing cache; building without one")
        return "unreadable" if status == "unreadable" else "none"
    return status


def build_engine(onnx_file: Path, engine_file: Path, *, input_name: str, profile: dict[str, list[int]] | None,
                 options: dict[str, Any], timing_cache: Path) -> dict[str, Any]:
    """Parse ``onnx_file`` into a strongly typed network, build, write the plan; return build facts."""
    import tensorrt as trt

    log = process_logger()
    builder = trt.Builder(log)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, log)
    with captured_errors() as logged:
        parsed = parser.parse_from_file(str(onnx_file))
    if not parsed:
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)] or logged
        first = _reason([errors[0]] if errors else [], "unknown error")
        raise DeployError(f"TensorRT's ONNX parser rejected {onnx_file.name}: {first}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options["workspace_mib"]) << 20)
    config.builder_optimization_level = int(options["builder_optimization_level"])
    if profile is not None:
        shapes = builder.create_optimization_profile()
        shapes.set_shape(input_name, profile["min"], profile["opt"], profile["max"])
        config.add_optimization_profile(shapes)
    cache_status = attach_timing_cache(config, timing_cache)
    with captured_errors() as logged:
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DeployError(f"TensorRT could not build an engine from {onnx_file.name}: "
                          f"{_reason(logged, 'see the log (-vv)')}")
    with atomic_file(engine_file, force=True) as tmp:
        tmp.write_bytes(bytes(memoryview(plan)))
    used = config.get_timing_cache()
    if used is not None and cache_status != "unreadable":
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(timing_cache, force=True) as tmp:
            tmp.write_bytes(bytes(memoryview(used.serialize())))
    return {"tensorrt_version": trt.__version__, "strongly_typed_flag": strongly_typed is not None,
            "timing_cache_reused": cache_status == "reused", "timing_cache_status": cache_status,
            "engine_bytes": engine_file.stat().st_size}


def check_input_shape(shape: Sequence[int], engine_shape: Sequence[int],
                      profile: tuple[Sequence[int], Sequence[int]] | None) -> None:
    """Refuse an input shape the engine does not take, before any buffer is bound.

    ``engine_shape`` is the engine's input shape (-1 where dynamic); ``profile`` the (min, max)
    shapes of optimization profile 0 when a dimension is dynamic. TensorRT reads a buffer of
    the engine's shape, so binding a smaller one would be read out of bounds silently.
    """
    shape, engine_shape = tuple(int(d) for d in shape), tuple(int(d) for d in engine_shape)
    if len(shape) != len(engine_shape):
        raise DeployError(f"input of shape {shape}: this engine takes rank-{len(engine_shape)} inputs "
                          f"{engine_shape}")
    if all(d >= 0 for d in engine_shape):
        if shape != engine_shape:
            what = (f"batches of exactly {engine_shape[0]}" if shape[1:] == engine_shape[1:]
                    else f"inputs of shape {engine_shape}")
            raise DeployError(f"input of shape {shape}: this fixed-shape engine takes {what}")
        return
    low, high = (tuple(int(d) for d in p) for p in profile) if profile is not None else (engine_shape, engine_shape)
    for axis, (size, fixed) in enumerate(zip(shape, engine_shape)):
        if fixed >= 0 and size != fixed:
            raise DeployError(f"input of shape {shape}: dimension {axis} must be {fixed} (engine {engine_shape})")
        if fixed < 0 and not low[axis] <= size <= high[axis]:
            raise DeployError(f"input of shape {shape}: dimension {axis} is outside the engine's optimization "
                              f"profile ({low[axis]} to {high[axis]})")


class TensorRTRunner:
    """An engine on the current CUDA device: NCHW float32 numpy in, logits out."""

    def __init__(self, engine_file: Path, *, profile: dict[str, list[int]] | None, threads: int) -> None:
        import tensorrt as trt
        import torch

        self.threads = threads  # host threads are not used; kept for the Runner protocol
        self._runtime = trt.Runtime(process_logger())
        with captured_errors() as logged:
            self.engine = self._runtime.deserialize_cuda_engine(Path(engine_file).read_bytes())
        if self.engine is None:
            raise DeployError(f"TensorRT cannot load {engine_file}: {_reason(logged, 'unknown error')}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise DeployError(f"{engine_file}: expected one input and one output, got {inputs} and {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.dtypes = {n: torch.from_numpy(np.empty(0, trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
                       for n in (self.input_name, self.output_name)}
        # The engine says what it takes; build.json's profile is only what was asked for.
        self.input_shape = tuple(int(d) for d in self.engine.get_tensor_shape(self.input_name))
        self.input_profile = None
        if any(d < 0 for d in self.input_shape):
            low, _, high = self.engine.get_tensor_profile_shape(self.input_name, 0)
            self.input_profile = (tuple(int(d) for d in low), tuple(int(d) for d in high))
        self.max_batch = self.input_profile[1][0] if self.input_profile else None
        self.fixed_batch = None if self.input_profile else self.input_shape[0]
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self._buffers: dict[tuple[int, ...], dict[str, Any]] = {}

    def _bind(self, shape: tuple[int, ...]) -> dict[str, Any]:
        """Device and pinned host buffers for an input ``shape``, bound to the context."""
        import torch

        check_input_shape(shape, self.input_shape, self.input_profile)
        if self.fixed_batch is None and not self.context.set_input_shape(self.input_name, shape):
            raise DeployError(f"input shape {shape} is outside the engine's optimization profile")
        buffers = self._buffers.get(shape)
        if buffers is None:
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            buffers = {
                "d_in": torch.empty(shape, dtype=self.dtypes[self.input_name], device=self.device),
                "d_out": torch.empty(out_shape, dtype=self.dtypes[self.output_name], device=self.device),
                "h_in": torch.empty(shape, dtype=self.dtypes[self.input_name]).pin_memory(),
                "h_out": torch.empty(out_shape, dtype=self.dtypes[self.output_name]).pin_memory(),
            }
            self._buffers[shape] = buffers
        self.context.set_tensor_address(self.input_name, buffers["d_in"].data_ptr())
        self.context.set_tensor_address(self.output_name, buffers["d_out"].data_ptr())
        return buffers

    def _execute(self) -> None:
        with captured_errors() as logged:
            done = self.context.execute_async_v3(self.stream.cuda_stream)
        if not done:
            raise DeployError(f"TensorRT execution failed: {_reason(logged, 'unknown error')}")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        buffers = self._bind(tuple(batch.shape))
        buffers["h_in"].numpy()[...] = batch
        with torch.cuda.stream(self.stream):
            buffers["d_in"].copy_(buffers["h_in"], non_blocking=True)
            self._execute()
            buffers["h_out"].copy_(buffers["d_out"], non_blocking=True)
        self.stream.synchronize()
        return buffers["h_out"].numpy().astype(np.float32, copy=True)

    def _chunks(self, inputs: np.ndarray) -> list[np.ndarray]:
        step = self.fixed_batch or self.max_batch or len(inputs)
        if self.fixed_batch and len(inputs) % self.fixed_batch:
            raise DeployError(f"this engine takes batches of {self.fixed_batch}; got {len(inputs)} inputs")
        return [inputs[i : i + step] for i in range(0, len(inputs), step)]

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        return np.concatenate([self._run(chunk) for chunk in self._chunks(inputs)])

    def _timed(self, work: Any) -> Any:
        """A measure function: CUDA events around ``work()`` on the stream, one request at a time.

        Waiting for each end event before the next iteration (as the torch-cuda target does)
        makes a figure one request's device time including launch overhead, not a pipelined one.
        """
        import torch

        def measure(n: int) -> np.ndarray:
            times = np.empty(n, dtype=np.float64)
            for i in range(n):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(self.stream)
                work()
                end.record(self.stream)
                end.synchronize()
                times[i] = start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds
            return times

        return measure

    def timer(self, inputs: np.ndarray):
        """GPU compute time per iteration (seconds), CUDA events around execute_async_v3 only."""
        import torch

        batch = np.ascontiguousarray(inputs, dtype=np.float32)
        buffers = self._bind(tuple(batch.shape))  # refuses a shape the engine does not take
        buffers["d_in"].copy_(torch.from_numpy(batch).to(self.device))
        torch.cuda.synchronize(self.device)
        timed = self._timed(self._execute)

        def measure(n: int) -> np.ndarray:
            self._bind(tuple(batch.shape))  # another call may have bound other buffers meanwhile
            return timed(n)

        return measure

    def copy_timers(self, inputs: np.ndarray) -> dict[str, Any]:
        """Host-to-device and device-to-host copy time per iteration (seconds), pinned buffers."""
        import torch

        batch = np.ascontiguousarray(inputs, dtype=np.float32)
        buffers = self._bind(tuple(batch.shape))  # refuses a shape the engine does not take
        buffers["h_in"].numpy()[...] = batch

        def h2d() -> None:
            with torch.cuda.stream(self.stream):
                buffers["d_in"].copy_(buffers["h_in"], non_blocking=True)

        def d2h() -> None:
            with torch.cuda.stream(self.stream):
                buffers["h_out"].copy_(buffers["d_out"], non_blocking=True)

        return {"h2d": self._timed(h2d), "d2h": self._timed(d2h)}
