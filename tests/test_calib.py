"""Calibration sets: preprocessing, sources (folder, tar.gz, arrays), seeded subsets, recipes, profiles."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploykit.backends.base import Option, get_backend, resolve_options
from deploykit.calib import (
    MIN_RECOMMENDED_SAMPLES, CalibrationSet, Preprocessing, default_recipe, list_recipes, load_calibration,
    load_recipe, open_source,
)
from deploykit.errors import DeployError, UsageError
from deploykit.profiles import list_profiles, load_profile, resolve_target

from conftest import CIFAR_TGZ  # one definition (DEPLOYKIT_CIFAR_TGZ or ../shared/data)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _image(seed: int, size: tuple[int, int] = (32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/<class>/*.png: 3 classes x 12 lossless images."""
    root = tmp_path_factory.mktemp("tree")
    for c, name in enumerate(("cat", "dog", "emu")):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i in range(12):
            _image(100 * c + i).save(folder / f"{i:03d}.png")
    return root


def test_preprocessing_is_the_documented_formula() -> None:
    pre = Preprocessing(size=32, mean=CIFAR_MEAN, std=CIFAR_STD)
    image = _image(1)
    expected = ((np.asarray(image, np.float32) / 255 - CIFAR_MEAN) / CIFAR_STD).transpose(2, 0, 1)
    np.testing.assert_allclose(pre.apply(image), expected, rtol=1e-6, atol=1e-6)
    bgr = Preprocessing(size=32, mean=CIFAR_MEAN, std=CIFAR_STD, channel_order="BGR", layout="NHWC").apply(image)
    np.testing.assert_allclose(bgr, expected.transpose(1, 2, 0)[..., ::-1], rtol=1e-6, atol=1e-6)


def test_imagenet_style_resizes_shorter_side_then_center_crops() -> None:
    pre = default_recipe(224).preprocessing
    assert (pre.size, pre.resize) == (224, 256)
    assert pre.apply(_image(2, (400, 300))).shape == (3, 224, 224)
    with pytest.raises(DeployError, match="smaller than the 32x32 input"):
        Preprocessing(size=32).apply(_image(3, (16, 16)), "small.png")


def test_folder_and_tar_give_identical_tensors_and_labels(tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "train", arcname="train")
    from_dir = load_calibration(str(tree), input_size=32, num_samples=20, num_verify=8, seed=3)
    from_tar = load_calibration(str(archive), input_size=32, num_samples=20, num_verify=8, seed=3)
    assert from_dir.sha256 == from_tar.sha256
    np.testing.assert_array_equal(from_dir.labels, from_tar.labels)
    np.testing.assert_array_equal(from_dir.held_out, from_tar.held_out)
    assert from_dir.classes == ("cat", "dog", "emu")
    assert (len(from_dir), len(from_dir.held_out)) == (20, 8)


def test_subset_is_seeded_and_held_out_is_disjoint(tree: Path) -> None:
    a = load_calibration(str(tree), input_size=32, num_samples=16, num_verify=8, seed=0)
    b = load_calibration(str(tree), input_size=32, num_samples=16, num_verify=8, seed=0)
    c = load_calibration(str(tree), input_size=32, num_samples=16, num_verify=8, seed=1)
    assert a.sha256 == b.sha256 != c.sha256
    calib_rows = {row.tobytes() for row in a.inputs}
    assert not any(row.tobytes() in calib_rows for row in a.held_out)
    summary = a.summary()
    assert summary["count"] == 16 and summary["seed"] == 0 and summary["synthetic"] is False


def test_synthetic_fallback_is_marked_and_deterministic() -> None:
    a = load_calibration(None, input_size=32, num_samples=8, num_verify=4)
    b = load_calibration(None, input_size=32, num_samples=8, num_verify=4)
    assert isinstance(a, CalibrationSet) and a.synthetic and "synthetic" in a.source
    assert a.sha256 == b.sha256 and a.inputs.shape == (8, 3, 32, 32)
    assert not np.array_equal(a.inputs[:4], a.held_out)


def test_arrays_float_and_uint8(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((10, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    got = load_calibration(str(tmp_path / "x.npy"), input_size=32, num_samples=6, num_verify=4)
    assert {r.tobytes() for r in got.inputs} <= {r.tobytes() for r in x}
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", images=images, labels=np.arange(6) % 2)
    source = open_source(tmp_path / "imgs.npz")
    pre = default_recipe(32).preprocessing
    np.testing.assert_allclose(source.load([2], pre)[0], pre.apply(Image.fromarray(images[2])), atol=1e-6)
    assert source.labels().tolist() == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no images"),
        (lambda p: _write(p / "bad" / "c" / "x.jpg", b"not a jpeg") or p / "bad", "cannot read image"),
        (lambda p: _image(0, (16, 16)).save(_mk(p / "small" / "c") / "s.png") or p / "small", "smaller than"),
        (lambda p: np.save(p / "nan.npy", np.full((4, 3, 32, 32), np.nan, np.float32)) or p / "nan.npy",
         "NaN or inf"),
        (lambda p: np.save(p / "shape.npy", np.zeros((4, 3, 28, 28), np.float32)) or p / "shape.npy",
         r"the model takes \(3, 32, 32\)"),
    ],
    ids=["missing", "empty", "unreadable", "too-small", "nan", "wrong-shape"],
)
def test_bad_calibration_data_is_one_clear_error(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(DeployError, match=message):
        load_calibration(str(make(tmp_path)), input_size=32, num_samples=4, num_verify=2)


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write(path: Path, data: bytes) -> None:
    _mk(path.parent)
    path.write_bytes(data)


@pytest.mark.skipif(not CIFAR_TGZ.is_file(), reason=f"CIFAR-10 tarball not found at {CIFAR_TGZ}")
def test_cifar_tarball_read_in_place() -> None:
    calib = load_calibration(str(CIFAR_TGZ), input_size=32, num_samples=48, num_verify=16)
    assert calib.source.endswith(":train") and calib.classes[0] == "airplane" and len(calib.classes) == 10
    assert calib.inputs.shape == (48, 3, 32, 32) and calib.inputs.dtype == np.float32
    # Normalized with the CIFAR statistics: roughly zero mean, unit spread.
    assert abs(float(calib.inputs.mean())) < 0.3 and 0.7 < float(calib.inputs.std()) < 1.3
    assert len(calib) < MIN_RECOMMENDED_SAMPLES


def test_recipe_by_path_brings_its_data_and_preprocessing(tree: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"source: {tree}\nnum_samples: 10\nseed: 5\n"
                      "preprocessing: {size: 32, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}\n")
    calib = load_calibration(str(recipe), input_size=32, num_verify=4)
    assert (len(calib), calib.seed, calib.recipe, calib.preprocessing.std) == (10, 5, "mine", (0.25, 0.25, 0.25))
    recipe.write_text("source: /nowhere\npreprocessing: {size: 32}\n")
    with pytest.raises(DeployError, match="reads /nowhere, which does not exist here; pass the data with --calib"):
        load_calibration(str(recipe), input_size=32)


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_recipe_loads(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.preprocessing.size in (32, 224)


def test_unknown_recipe_key_lists_valid_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsamples: 3\npreprocessing: {size: 32}\n")
    with pytest.raises(UsageError, match="unknown key 'samples'; valid keys: name, description, source"):
        load_recipe(str(bad))
    bad.write_text("preprocessing: {size: 32, scale: 2}\n")
    with pytest.raises(UsageError, match="unknown key 'preprocessing.scale'; valid keys: size, resize"):
        load_recipe(str(bad))


@pytest.mark.parametrize("name", sorted(list_profiles()))
def test_every_profile_names_a_real_target_precision_and_options(name: str) -> None:
    profile = load_profile(name)
    backend = get_backend(profile.target)
    assert profile.precision in backend.precisions
    resolve_options(backend.name, backend.options, profile.options, profile.precision)
    assert resolve_target(name) == profile


def test_options_are_validated() -> None:
    specs = {"flag": Option(True, "a flag"), "mode": Option("a", "mode", ("a", "b")),
             "drop": Option(None, "x", precisions=("int8",), kind=float)}
    assert resolve_options("t", specs, {"flag": "off", "mode": "B", "drop": "0.5"}, "int8") == {
        "flag": False, "mode": "b", "drop": 0.5}
    assert "drop" not in resolve_options("t", specs, {}, "fp32")
    for given, message in [({"nope": 1}, "unknown option nope for target t; valid options: drop, flag, mode"),
                           ({"flag": "maybe"}, "expected bool"), ({"mode": "c"}, "choose from a, b"),
                           ({"drop": "0.1"}, "applies to precision int8, not fp32")]:
        with pytest.raises(UsageError, match=message):
            resolve_options("t", specs, given, "fp32")
