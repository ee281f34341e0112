"""Where calibration and evaluation samples come from.

- an image-folder tree (``root/<class>/*.jpg``, optionally under ``root/<split>/``), or a flat
  folder of images (unlabeled);
- the same tree packed as ``.tar``/``.tar.gz``/``.tgz``, read in place without extracting;
- ``.npy``/``.npz`` arrays: float tensors already preprocessed (N, C, H, W), or uint8 images
  (N, H, W, 3) that get the preprocessing.

Each source lists its items (cheap) and loads any subset of them (the expensive part), so a
seeded subset of 60,000 images costs only the images it uses.
"""
from __future__ import annotations

import io
import tarfile
from functools import lru_cache
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol

from deploykit.errors import DeployError, one_line

if TYPE_CHECKING:
    import numpy as np

    from deploykit.calib.preprocess import Preprocessing

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
ARRAY_SUFFIXES = (".npy", ".npz")
_ARRAY_KEYS = ("inputs", "x", "images", "data")
_LABEL_KEYS = ("labels", "y", "targets")


class Source(Protocol):
    description: str
    classes: tuple[str, ...] | None  # class names, index = label; None when unlabeled

    def __len__(self) -> int: ...

    def labels(self) -> np.ndarray | None: ...

    def load(self, indices: Sequence[int], preprocessing: Preprocessing) -> np.ndarray: ...

    def iter_load(
        self, indices: Sequence[int], preprocessing: Preprocessing, chunk: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(indices, tensors) in chunks of up to ``chunk``, in whatever order reads fastest."""


def _chunked(source: Source, indices: Sequence[int], preprocessing: Preprocessing, chunk: int):
    import numpy as np

    indices = np.asarray(indices, dtype=np.int64)
    for start in range(0, len(indices), chunk):
        part = indices[start : start + chunk]
        yield part, source.load(part, preprocessing)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _decode(data: bytes | Path, name: str, preprocessing: Preprocessing) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image.load()
            return preprocessing.apply(image, name)
    except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as err:
        raise DeployError(f"cannot read image {name}: {one_line(err)}") from err


def _label_items(paths: list[PurePosixPath]) -> tuple[list[tuple[PurePosixPath, int | None]], tuple[str, ...] | None]:
    """Label by the first folder under the root; a flat folder is unlabeled."""
    paths = sorted(p for p in paths if _is_image(p.name))
    nested = [p for p in paths if len(p.parts) >= 2]
    if nested:
        classes = tuple(sorted({p.parts[0] for p in nested}))
        index = {c: i for i, c in enumerate(classes)}
        return [(p, index[p.parts[0]]) for p in nested], classes
    return [(p, None) for p in paths], None


def _labels_of(items: list[tuple[PurePosixPath, int | None]]) -> np.ndarray | None:
    import numpy as np

    if not items or items[0][1] is None:
        return None
    return np.asarray([label for _, label in items], dtype=np.int64)


class ImageFolder:
    def __init__(self, root: Path, split: str | None = None) -> None:
        if split and (root / split).is_dir():
            root = root / split
        self.root = root
        self.description = str(root)
        files = [PurePosixPath(p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file()]
        self.items, self.classes = _label_items(files)
        if not self.items:
            raise DeployError(f"folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> np.ndarray | None:
        return _labels_of(self.items)

    def load(self, indices: Sequence[int], preprocessing: Preprocessing) -> np.ndarray:
        import numpy as np

        paths = [self.root / self.items[i][0] for i in indices]
        rows = [_decode(path, str(path), preprocessing) for path in paths]
        return np.stack(rows) if rows else np.zeros((0, *preprocessing.input_shape), np.float32)

    def iter_load(self, indices: Sequence[int], preprocessing: Preprocessing, chunk: int):
        return _chunked(self, indices, preprocessing, chunk)


def _archive_problem(err: BaseException) -> str:
    """One line: tarfile's "r:*" error lists every compression method it tried, one per line."""
    if isinstance(err, tarfile.ReadError) and "could not be opened successfully" in str(err):
        return "not a tar archive (plain, gzip, bz2 or xz)"
    return one_line(err)


@lru_cache(maxsize=8)
def _tar_members(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    """Names of the files in the archive (one pass over it; cached per file version)."""
    try:
        with tarfile.open(path, "r:*") as archive:
            return tuple(m.name.removeprefix("./") for m in archive if m.isfile())
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DeployError(f"cannot read archive {path}: {_archive_problem(err)}") from err


class TarImageFolder:
    """An image-folder tree inside a tar archive, read without extracting it."""

    def __init__(self, path: Path, split: str | None = None) -> None:
        self.path = path
        stat = path.stat()
        members = _tar_members(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        prefix = ""
        if split and any(name.startswith(f"{split}/") for name in members):
            prefix = f"{split}/"
        self.description = f"{path}:{prefix.rstrip('/')}" if prefix else str(path)
        self._prefix = prefix
        names = [PurePosixPath(n[len(prefix) :]) for n in members if n.startswith(prefix)]
        self.items, self.classes = _label_items(names)
        if not self.items:
            raise DeployError(f"archive {self.description} holds no images ({', '.join(IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> np.ndarray | None:
        return _labels_of(self.items)

    def _stream(self, indices: Sequence[int], preprocessing: Preprocessing) -> Iterator[tuple[int, np.ndarray]]:
        """(index, tensor) for ``indices`` in archive order: a compressed stream is read once."""
        wanted = {str(self.items[i][0]): int(i) for i in indices}
        left = len(wanted)
        if not left:
            return
        try:
            with tarfile.open(self.path, "r:*") as archive:
                for member in archive:
                    full = member.name.removeprefix("./")
                    index = wanted.pop(full[len(self._prefix):], None) if full.startswith(self._prefix) else None
                    if index is None:
                        continue
                    data = archive.extractfile(member).read()
                    yield index, _decode(data, f"{self.path}:{member.name}", preprocessing)
                    left -= 1
                    if not left:
                        return
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DeployError(f"cannot read archive {self.path}: {_archive_problem(err)}") from err

    def load(self, indices: Sequence[int], preprocessing: Preprocessing) -> np.ndarray:
        import numpy as np

        rows = dict(self._stream(indices, preprocessing))
        if not rows:
            return np.zeros((0, *preprocessing.input_shape), np.float32)
        return np.stack([rows[int(i)] for i in indices])

    def iter_load(self, indices: Sequence[int], preprocessing: Preprocessing, chunk: int):
        import numpy as np

        done: list[int] = []
        rows: list[np.ndarray] = []
        for index, row in self._stream(indices, preprocessing):
            done.append(index)
            rows.append(row)
            if len(rows) == chunk:
                yield np.asarray(done), np.stack(rows)
                done, rows = [], []
        if rows:
            yield np.asarray(done), np.stack(rows)


class ArrayFile:
    """Samples in a ``.npy``/``.npz`` file."""

    def __init__(self, path: Path) -> None:
        import numpy as np

        self.path = path
        self.description = str(path)
        try:
            loaded = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise DeployError(f"cannot read array file {path}: {err}") from err
        labels = None
        if isinstance(loaded, np.ndarray):
            data = loaded
        else:
            with loaded:
                keys = list(loaded.files)
                key = next((k for k in _ARRAY_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise DeployError(f"{path} holds arrays {keys}; name the inputs one of {', '.join(_ARRAY_KEYS)}")
                data = loaded[key]
                label_key = next((k for k in _LABEL_KEYS if k in keys), None)
                labels = loaded[label_key].astype(np.int64) if label_key else None
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise DeployError(f"{path} contains NaN or inf values")
        if data.dtype.kind not in "fu" or data.ndim != 4:
            raise DeployError(
                f"{path}: expected float32 tensors (N, 3, H, W) or uint8 images (N, H, W, 3); "
                f"got {data.dtype} {tuple(data.shape)}"
            )
        if labels is not None and len(labels) != len(data):
            raise DeployError(f"{path}: {len(labels)} labels for {len(data)} samples")
        if len(data) == 0:
            raise DeployError(f"{path} holds no samples")
        self.data, self._labels = data, labels
        self.classes = tuple(str(i) for i in range(int(labels.max()) + 1)) if labels is not None else None

    def __len__(self) -> int:
        return len(self.data)

    def labels(self) -> np.ndarray | None:
        return self._labels

    def load(self, indices: Sequence[int], preprocessing: Preprocessing) -> np.ndarray:
        import numpy as np
        from PIL import Image

        rows = self.data[np.asarray(indices, dtype=np.int64)]
        if rows.dtype == np.uint8:
            if rows.shape[-1] != 3:
                raise DeployError(f"{self.path}: uint8 images must be (N, H, W, 3); got {tuple(self.data.shape)}")
            images = [preprocessing.apply(Image.fromarray(r), f"{self.path}[{i}]") for i, r in zip(indices, rows)]
            return np.stack(images)
        if rows.shape[1:] != preprocessing.input_shape:
            raise DeployError(
                f"{self.path}: samples are {tuple(rows.shape[1:])}, the model takes {preprocessing.input_shape}"
            )
        return np.ascontiguousarray(rows, dtype=np.float32)

    def iter_load(self, indices: Sequence[int], preprocessing: Preprocessing, chunk: int):
        return _chunked(self, indices, preprocessing, chunk)


def open_source(path: str | Path, split: str | None = None) -> Source:
    """The source at ``path``: a folder, an archive or an array file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DeployError(f"data {path} does not exist")
    if path.is_dir():
        return ImageFolder(path, split)
    name = path.name.lower()
    if name.endswith(TAR_SUFFIXES):
        return TarImageFolder(path, split)
    if name.endswith(ARRAY_SUFFIXES):
        return ArrayFile(path)
    raise DeployError(
        f"data {path}: expected a folder of images, an archive ({', '.join(TAR_SUFFIXES)}) "
        f"or arrays ({', '.join(ARRAY_SUFFIXES)})"
    )


def labeled_subset(data: str | Path, split: str | None, limit: int | None, seed: int = 0) -> tuple[Source, np.ndarray, np.ndarray]:
    """(source, labels, sorted indices) of a labeled image set; ``limit``: a seeded subset."""
    import numpy as np

    source = open_source(data, split)
    labels = source.labels()
    if labels is None:
        raise DeployError(f"{source.description} has no labels: use one folder per class")
    indices = np.arange(len(source))
    if limit is not None and limit < len(source):
        indices = np.sort(np.random.default_rng(seed).choice(len(source), size=limit, replace=False))
    return source, labels, indices
