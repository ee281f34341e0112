"""The preprocessing spec: how an image becomes the model's input tensor.

Stored with every artifact (``build.json``) so ``deploykit eval`` and deployed code feed the
model exactly what it was calibrated and verified on.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deploykit.errors import DeployError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# An image upscaled this much or more to fill the model input is not what the model will see.
UPSCALE_WARN_FACTOR = 2.0


class UpscaleWarning(UserWarning):
    """Calibration images much smaller than the model input."""


class Preprocessing(BaseModel):
    """Resize the shorter side, center-crop ``size``, scale to [0, 1], normalize, lay out."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(gt=0, description="output height and width in pixels")
    resize: int | None = Field(
        default=None, gt=0, description="shorter side before the crop; None: the image must be at least `size`"
    )
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN  # on the [0, 1] scale
    std: tuple[float, float, float] = IMAGENET_STD
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    @model_validator(mode="after")
    def _check(self) -> Preprocessing:
        if self.resize is not None and self.resize < self.size:
            raise ValueError(f"resize {self.resize} is smaller than the crop size {self.size}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one sample (without the batch dimension)."""
        return (3, self.size, self.size) if self.layout == "NCHW" else (self.size, self.size, 3)

    def apply(self, image: Image.Image, name: str = "image") -> np.ndarray:
        """One PIL image -> float32 array of ``input_shape``; an image smaller than the crop is an error."""
        import numpy as np
        from PIL import Image

        image = image.convert("RGB")
        if self.resize is not None:
            w, h = image.size
            scale = self.resize / min(w, h)
            if scale >= UPSCALE_WARN_FACTOR:
                warnings.warn(UpscaleWarning(
                    f"calibration images of {w}x{h} are upscaled {scale:.1f}x for the {self.size}x{self.size} input: "
                    "INT8 ranges from upscaled images may not match real inputs; calibrate with images of about "
                    "the model's input size"
                ), stacklevel=2)
            new = (max(self.size, round(w * scale)), max(self.size, round(h * scale)))
            resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
            image = image.resize(new, resample[self.interpolation])
        w, h = image.size
        if w < self.size or h < self.size:
            raise DeployError(
                f"{name} is {w}x{h}, smaller than the {self.size}x{self.size} input; "
                "set `resize` in the calibration recipe or use images of the model's input size"
            )
        left, top = (w - self.size) // 2, (h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.channel_order == "BGR":
            pixels = pixels[..., ::-1]
        if self.layout == "NCHW":
            pixels = pixels.transpose(2, 0, 1)
        return np.ascontiguousarray(pixels, dtype=np.float32)
