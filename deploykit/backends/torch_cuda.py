"""PyTorch on an NVIDIA GPU (no TensorRT): eager FP32/FP16, channels_last, CUDA graphs, torch.compile.

NOT RUN HERE: the machine this was written on has no GPU. The code follows the PyTorch
documentation (CUDA semantics, ``torch.cuda.graphs``, ``torch.compile``, ``torch.cuda.Event``)
and is exercised only on a machine with CUDA; without one the target reports itself
unavailable and sweeps record its rows as skipped with that reason.

The artifact is the model saved with ``torch.export`` on the GPU, in the precision asked for
(``model.pt2``, batch fixed as exported). Options, applied when the artifact is loaded:

- ``channels_last``: NHWC memory format for weights and inputs (tensor cores prefer it);
- ``cuda_graphs``: capture one forward pass in a ``torch.cuda.CUDAGraph`` and replay it, which
  removes per-kernel launch overhead (static input/output buffers, one graph per input shape);
- ``compile``: ``torch.compile`` mode (``default``, ``reduce-overhead`` which uses CUDA graphs
  itself, ``max-autotune``); ``none`` runs eager. Not combined with ``cuda_graphs``.

Timing: ``runner.timer(inputs)`` keeps the input on the GPU and times each iteration with CUDA
events recorded around the forward pass, waiting for the end event before the next iteration,
so a figure is one request's device-side latency including launch overhead, excluding the
host-to-device copy of the input.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from deploykit.backends.base import Artifact, BackendBase, BuildConfig, Option, resolve_options
from deploykit.errors import DeployError, UsageError

MODEL_FILE = "model.pt2"
STATUS = ("written to the PyTorch CUDA documentation, never executed on deploykit's test machines (no GPU); "
          "sweeps record its rows as skipped")
CUDA_GRAPH_WARMUP = 3  # iterations on a side stream before capture, as the CUDA graphs docs do

OPTIONS = {
    "channels_last": Option(False, "NHWC memory format for weights and inputs"),
    "cuda_graphs": Option(False, "capture the forward pass once and replay it (no launch overhead)"),
    "compile": Option("none", "torch.compile mode; none: eager", ("none", "default", "reduce-overhead", "max-autotune")),
}


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class TorchCudaRunner:
    clock = "CUDA events around each forward pass (device time, input already on the GPU)"

    def __init__(self, module: Any, *, threads: int, precision: str, options: dict[str, Any]) -> None:
        import torch

        self.threads = threads
        torch.set_num_threads(threads)  # host-side work (Python, launches) only
        self.device = torch.device("cuda")
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.memory_format = torch.channels_last if options["channels_last"] else torch.contiguous_format
        module = module.to(self.device)
        if options["channels_last"]:
            module = module.to(memory_format=torch.channels_last)
        if options["compile"] != "none":
            module = torch.compile(module, mode=options["compile"])
        self.module = module
        self.use_graphs = bool(options["cuda_graphs"])
        self.graphs: dict[tuple[int, ...], tuple[Any, Any, Any]] = {}

    def _to_device(self, inputs: Any) -> Any:
        import numpy as np
        import torch

        x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        return x.to(self.device, dtype=self.dtype).contiguous(memory_format=self.memory_format)

    def _capture(self, x: Any) -> tuple[Any, Any, Any]:
        import torch

        static_in = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(CUDA_GRAPH_WARMUP):
                self.module(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_out = self.module(static_in)
        return graph, static_in, static_out

    def _forward(self, x: Any) -> Any:
        import torch

        if not self.use_graphs:
            with torch.no_grad():
                return self.module(x)
        key = tuple(x.shape)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out

    def __call__(self, inputs: Any) -> Any:
        out = self._forward(self._to_device(inputs))
        return out.float().cpu().numpy()  # .cpu() synchronizes with the stream

    def reset_device_peak(self) -> None:
        """Start counting peak GPU memory from here (deploykit.bench.memory calls it)."""
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def device_peak_bytes(self) -> int:
        """Peak GPU memory allocated by PyTorch's caching allocator since the last reset."""
        import torch

        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())

    def timer(self, inputs: Any):
        """A measure function (n -> seconds per iteration) timed with CUDA events."""
        import numpy as np
        import torch

        x = self._to_device(inputs)

        def measure(n: int) -> np.ndarray:
            times = np.empty(n, dtype=np.float64)
            for i in range(n):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                self._forward(x)
                end.record()
                end.synchronize()
                times[i] = start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds
            return times

        return measure


class TorchCudaBackend(BackendBase):
    name = "torch-cuda"
    precisions = ("fp32", "fp16")
    extra = "all"  # torch is a core dependency; the GPU build of torch comes from pytorch.org
    options = OPTIONS
    distributions = ("torch",)
    device = "gpu"
    builds_from_module = True

    def status(self) -> str | None:
        return None if _cuda_available() else STATUS

    def timer(self, runner: TorchCudaRunner, inputs: Any):
        return runner.timer(inputs)

    def clock(self) -> str:
        return TorchCudaRunner.clock

    def missing_reason(self) -> str:
        return ("target torch-cuda needs an NVIDIA GPU and a CUDA build of PyTorch: "
                "torch.cuda.is_available() is False on this machine")

    def version(self) -> str | None:
        """torch's version when a CUDA device is usable, else None (the target is unavailable)."""
        if not _cuda_available():
            return None
        import torch

        return f"{torch.__version__} (CUDA {torch.version.cuda})"

    def _options(self, config_options: dict[str, Any], precision: str) -> dict[str, Any]:
        options = resolve_options(self.name, self.options, config_options, precision)
        if options["cuda_graphs"] and options["compile"] != "none":
            raise UsageError("target torch-cuda: use cuda_graphs or compile, not both "
                             "(compile=reduce-overhead captures CUDA graphs itself)")
        return options

    def build(self, onnx_path: Path, out_dir: Path, config: BuildConfig) -> dict[str, Any]:
        import torch

        from deploykit.onnxio import onnx_io

        if not _cuda_available():
            raise DeployError(self.missing_reason())
        options = self._options(config.options, config.precision)
        if config.source_model is None:
            raise DeployError("target torch-cuda builds from a PyTorch model, not from an .onnx file")
        dtype = torch.float16 if config.precision == "fp16" else torch.float32
        shape = onnx_io(onnx_path)["inputs"][0]["shape"]
        batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 1
        model = config.source_model.eval().to("cuda", dtype=dtype)
        example = torch.zeros((batch, *shape[1:]), device="cuda", dtype=dtype)
        try:
            exported = torch.export.export(model, (example,))
        except Exception as err:  # torch.export raises many kinds for untraceable code
            raise DeployError(f"target torch-cuda cannot export the model: {type(err).__name__}: {err}") from err
        finally:
            config.source_model.to("cpu", dtype=torch.float32)  # the caller's model is left as it was
        torch.export.save(exported, str(out_dir / MODEL_FILE))
        return {"model_file": MODEL_FILE, "batch": batch, "options": options, "format": "torch.export (cuda)",
                "device": torch.cuda.get_device_name(0)}

    def load(self, artifact: Artifact, *, threads: int) -> TorchCudaRunner:
        import torch

        if not _cuda_available():
            raise DeployError(self.missing_reason())
        facts = artifact.backend
        path = artifact.path / facts["model_file"]
        try:
            module = torch.export.load(str(path)).module()
        except Exception as err:
            raise DeployError(f"cannot load {path}: {type(err).__name__}: {err}") from err
        return TorchCudaRunner(module, threads=threads, precision=artifact.precision,
                               options=self._options(facts.get("options", {}), artifact.precision))
