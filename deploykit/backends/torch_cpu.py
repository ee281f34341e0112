"""PyTorch eager on CPU: the reference every other target is verified against.

The artifact is the fused model saved with ``torch.export`` (``model.pt2``, batch dynamic):
self-contained, no model source code needed to run it.

- fp32: float32 arithmetic, contiguous (NCHW) tensors.
- bf16: the same file run under ``torch.autocast("cpu", torch.bfloat16)`` with weights and inputs
  in channels_last, so convolutions and matmuls go to oneDNN's bf16 kernels (AMX/AVX512-BF16);
  refused on a CPU without them. The executed dtype per aten op is recorded at build time.
  ``torch.compile`` is not used: it would move a compile step into every load.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from deploykit.backends.base import Artifact, BackendBase, BuildConfig, Option, installed_version, resolve_options
from deploykit.errors import DeployError

MODEL_FILE = "model.pt2"


class TorchRunner:
    """Any nn.Module (or exported module) on CPU, float32 in and out, under no_grad."""

    def __init__(self, module: Any, *, threads: int, arithmetic: str = "fp32") -> None:
        import torch

        self.threads = threads
        self.arithmetic = arithmetic
        torch.set_num_threads(threads)
        if arithmetic == "bf16":
            module = module.to(memory_format=torch.channels_last)
        self.module = module

    def _context(self):
        import contextlib

        import torch

        if self.arithmetic == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, inputs):
        import numpy as np
        import torch

        torch.set_num_threads(self.threads)
        x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        if self.arithmetic == "bf16":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._context():
            out = self.module(x)
        return out.float().numpy()

    def executed_precision(self, inputs) -> dict[str, dict[str, str]]:
        """aten op -> {output dtype: count} over one call: what the arithmetic really was."""
        import numpy as np
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        kinds: dict[str, dict[str, int]] = {}

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                first = out[0] if isinstance(out, (tuple, list)) and out else out
                if isinstance(first, torch.Tensor) and first.is_floating_point():
                    name = str(func.overloadpacket.__name__)
                    dtype = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}.get(first.dtype,
                                                                                                     str(first.dtype))
                    kinds.setdefault(name, {})
                    kinds[name][dtype] = kinds[name].get(dtype, 0) + 1
                return out

        x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        if self.arithmetic == "bf16":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._context(), Record():
            self.module(x)
        return kinds


class TorchBackend(BackendBase):
    name = "torch"
    precisions = ("fp32", "bf16")
    extra = "all"  # torch is a core dependency
    distributions = ("torch",)
    builds_from_module = True
    options: dict[str, Option] = {}

    def version(self) -> str | None:
        return installed_version("torch", "torch")

    def build(self, onnx_path: Path, out_dir: Path, config: BuildConfig) -> dict[str, Any]:
        import torch

        from deploykit.precision import cpu_flags, resolve

        options = resolve_options(self.name, self.options, config.options, config.precision)
        plan = resolve(config.precision, cpu_flags())  # bf16 without units: one line
        model = config.source_model
        if model is None:
            raise DeployError("target torch builds from a PyTorch model, not from an .onnx file")
        from deploykit.onnxio import onnx_io

        shape = onnx_io(onnx_path)["inputs"][0]["shape"]
        example = torch.zeros((2, *shape[1:]))
        batch = torch.export.Dim("batch", min=1, max=4096)
        try:
            exported = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
        except Exception as err:  # torch.export raises many kinds for untraceable code
            raise DeployError(f"target torch cannot export the model: {type(err).__name__}: {err}") from err
        torch.export.save(exported, str(out_dir / MODEL_FILE))
        runner = TorchRunner(exported.module(), threads=config.threads, arithmetic=plan.executes)
        return {
            "model_file": MODEL_FILE, "batch": None, "options": options, "format": "torch.export",
            "inference_precision": plan.executes,
            "arithmetic": {**plan.to_dict(),
                           "autocast": "bfloat16" if plan.executes == "bf16" else None,
                           "memory_format": "channels_last" if plan.executes == "bf16" else "contiguous"},
            "executed_precision": runner.executed_precision(example[:1].numpy()),
        }

    def load(self, artifact: Artifact, *, threads: int) -> TorchRunner:
        import torch

        path = artifact.path / artifact.backend["model_file"]
        try:
            module = torch.export.load(str(path)).module()
        except Exception as err:
            raise DeployError(f"cannot load {path}: {type(err).__name__}: {err}") from err
        return TorchRunner(module, threads=threads,
                           arithmetic=artifact.backend.get("inference_precision", "fp32"))
