"""Labeled image folders held in memory for training, with the standard CIFAR augmentation.

Images are decoded once through ``deploykit.calib`` sources (a folder tree or the same tree
as ``.tar.gz``), center-cropped to the model's input size by the calibration recipe, and kept
as uint8 (50,000 CIFAR images: 150 MB). Each epoch draws its order, crops and flips from a
generator seeded by (seed, epoch), so any epoch, and any step inside it, can be replayed
exactly: that is what makes an interrupted run resume bit for bit.

Normalization is the recipe's (``calib/cifar10.yaml`` for 32x32 models), the same numbers
``deploykit build`` calibrates with and ``deploykit eval`` feeds, so a trained checkpoint is
measured on exactly the inputs it was trained on.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from deploykit.calib import Preprocessing, open_source
from deploykit.calib.sources import IMAGE_SUFFIXES, ImageFolder
from deploykit.errors import DeployError

logger = logging.getLogger(__name__)

PAD_PIXELS = 4
IMBALANCE_WARN_RATIO = 1.5  # largest / smallest class count above which training warns
LOAD_CHUNK = 2048


@dataclass(frozen=True)
class ImageSet:
    """uint8 images (N, 3, H, W), int64 labels (N,), the class names (index = label)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    description: str

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts))


def _check_folder_tree(root: Path) -> None:
    """Errors a folder listing reveals but the source (which sees files only) cannot."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    def has_images(folder: Path) -> bool:
        return any(f.suffix.lower() in IMAGE_SUFFIXES for f in folder.rglob("*") if f.is_file())

    empty = [p.name for p in folders if not has_images(p)]
    if empty:
        raise DeployError(
            f"class folder(s) {', '.join(empty)} in {root} hold no images ({', '.join(IMAGE_SUFFIXES)}); "
            "remove them or add images: every folder under the data root is a class"
        )
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose and folders:
        logger.warning("%d image(s) directly in %s belong to no class folder and are ignored (e.g. %s)",
                       len(loose), root, loose[0])


def _raw(preprocessing: Preprocessing) -> Preprocessing:
    """The recipe's resize and crop without normalization: pixels in [0, 1], RGB, NCHW."""
    return preprocessing.model_copy(
        update={"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "channel_order": "RGB", "layout": "NCHW"}
    )


def load_image_set(
    data: str | Path,
    split: str | None,
    preprocessing: Preprocessing,
    *,
    limit: int | None = None,
    seed: int = 0,
    require_split: bool = False,
) -> ImageSet:
    """The labeled images of ``data`` (``split`` subfolder when present); ``limit``: a seeded subset.

    ``require_split``: the ``split`` subfolder must exist (a validation split must not fall back
    to the whole tree, which holds the training images).
    """
    import numpy as np

    source = open_source(data, split)
    found = source.description.rstrip("/").endswith(f"/{split}") or source.description.endswith(f":{split}")
    if require_split and split and not found:
        raise DeployError(f"{data} has no {split}/ split; pass one that exists (or 'none' to skip validation)")
    if isinstance(source, ImageFolder):
        _check_folder_tree(source.root)
    labels = source.labels()
    if labels is None or not source.classes:
        raise DeployError(
            f"{source.description} has no class folders; training needs one folder per class (root/<class>/*.jpg)"
        )
    indices = np.arange(len(source))
    if limit is not None and limit < len(source):
        indices = np.sort(np.random.default_rng(seed).choice(len(source), size=limit, replace=False))
    images = torch.empty((len(indices), *_raw(preprocessing).input_shape), dtype=torch.uint8)
    position = {int(i): k for k, i in enumerate(indices)}
    for chunk, pixels in source.iter_load(indices, _raw(preprocessing), LOAD_CHUNK):
        rows = torch.as_tensor([position[int(i)] for i in chunk])
        images[rows] = torch.from_numpy(np.rint(pixels * 255.0).astype(np.uint8))
    image_set = ImageSet(images, torch.from_numpy(labels[indices]).long(), tuple(source.classes), source.description)
    logger.info("loaded %d images in %d classes from %s", len(image_set), len(image_set.classes), source.description)
    return image_set


def check_training_data(train: ImageSet, val: ImageSet | None, num_classes: int) -> None:
    """Class folders must match the model and each other; warn when classes are imbalanced."""
    if len(train.classes) != num_classes:
        raise DeployError(
            f"{train.description} has {len(train.classes)} class folders ({', '.join(train.classes[:12])}) "
            f"but the model has {num_classes} outputs; pass --num-classes {len(train.classes)} or fix the folders"
        )
    if val is not None and val.classes != train.classes:
        missing = sorted(set(train.classes) - set(val.classes))
        extra = sorted(set(val.classes) - set(train.classes))
        raise DeployError(
            f"class folders of {val.description} differ from {train.description}: "
            f"missing {', '.join(missing) or '-'}; unexpected {', '.join(extra) or '-'}"
            + ("" if missing or extra else "; (same names, different order)")
        )
    counts = train.class_counts()
    absent = [name for name, n in counts.items() if n == 0]
    if absent:
        raise DeployError(f"the training subset has no images of class(es) {', '.join(absent)}; use more data")
    low, high = min(counts.values()), max(counts.values())
    if high > IMBALANCE_WARN_RATIO * low:
        rarest = min(counts, key=counts.get)
        commonest = max(counts, key=counts.get)
        logger.warning(
            "imbalanced classes in %s: %s has %d images, %s has %d (ratio %.1f); "
            "accuracy will favour the common classes",
            train.description, commonest, high, rarest, low, high / low,
        )


class Normalizer:
    """uint8 NCHW batch -> float32 normalized as the recipe says (channel order included)."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(preprocessing.std).view(1, 3, 1, 1) * 255.0
        self.bgr = preprocessing.channel_order == "BGR"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return x.flip(1) if self.bgr else x


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random stream of one epoch, independent of every other epoch."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def steps_per_epoch(count: int, batch_size: int) -> int:
    return count // batch_size  # the last partial batch is dropped: BN statistics need full batches


def train_batches(
    data: ImageSet, normalize: Normalizer, *, batch_size: int, seed: int, epoch: int, start_step: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled, augmented batches of one epoch (random crop with 4-pixel zero padding, flip).

    All of the epoch's random draws are made up front, so starting at ``start_step`` yields
    exactly the batches an uninterrupted epoch would have yielded from there.
    """
    gen = epoch_generator(seed, epoch)
    n, size = len(data), data.images.shape[-1]
    order = torch.randperm(n, generator=gen)
    offsets = torch.randint(0, 2 * PAD_PIXELS + 1, (n, 2), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    rows = torch.arange(size)
    for step in range(start_step, steps_per_epoch(n, batch_size)):
        pick = order[step * batch_size : (step + 1) * batch_size]
        padded = torch.nn.functional.pad(data.images[pick], [PAD_PIXELS] * 4)  # zeros: black border
        dy, dx = offsets[pick, 0], offsets[pick, 1]
        ys = (dy[:, None] + rows[None, :])[:, None, :, None].expand(-1, 3, size, size + 2 * PAD_PIXELS)
        cropped = padded.gather(2, ys)
        xs = (dx[:, None] + rows[None, :])[:, None, None, :].expand(-1, 3, size, size)
        cropped = cropped.gather(3, xs)
        cropped = torch.where(flips[pick].view(-1, 1, 1, 1), cropped.flip(3), cropped)
        yield normalize(cropped), data.labels[pick]


def eval_batches(data: ImageSet, normalize: Normalizer, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(data), batch_size):
        yield normalize(data.images[start : start + batch_size]), data.labels[start : start + batch_size]
