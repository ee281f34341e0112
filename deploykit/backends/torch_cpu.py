"""PyTorch eager on CPU: the reference every other target is verified against.

The artifact is the fused model saved with ``torch.export`` (``model.pt2``, batch dynamic):
self-contained, no model source code needed to run it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from deploykit.backends.base import Artifact, BackendBase, BuildConfig, Option, installed_version, resolve_options
from deploykit.errors import DeployError

MODEL_FILE = "model.pt2"


class TorchRunner:
    """Any nn.Module (or exported module) on CPU, float32 in and out, under no_grad."""

    def __init__(self, module: Any, *, threads: int) -> None:
        import torch

        self.module = module
        self.threads = threads
        torch.set_num_threads(threads)

    def __call__(self, inputs):
        import numpy as np
        import torch

        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)))
        return out.float().numpy()


class TorchBackend(BackendBase):
    name = "torch"
    precisions = ("fp32",)
    extra = "all"  # torch is a core dependency
    distributions = ("torch",)
    builds_from_module = True
    options: dict[str, Option] = {}

    def version(self) -> str | None:
        return installed_version("torch", "torch")

    def build(self, onnx_path: Path, out_dir: Path, config: BuildConfig) -> dict[str, Any]:
        import torch

        options = resolve_options(self.name, self.options, config.options, config.precision)
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
        return {"model_file": MODEL_FILE, "batch": None, "options": options, "format": "torch.export"}

    def load(self, artifact: Artifact, *, threads: int) -> TorchRunner:
        import torch

        path = artifact.path / artifact.backend["model_file"]
        try:
            module = torch.export.load(str(path)).module()
        except Exception as err:
            raise DeployError(f"cannot load {path}: {type(err).__name__}: {err}") from err
        return TorchRunner(module, threads=threads)
