"""A non-editable install outside the checkout still finds the shipped profiles and recipes
(``--target x86-openvino-int8``, ``--calib cifar10``): they travel inside the wheel."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import sys
import deploykit
from deploykit.calib import load_recipe
from deploykit.profiles import resolve_target

assert deploykit.__file__.startswith(sys.argv[1]), deploykit.__file__
profile = resolve_target("x86-openvino-int8")
recipe = load_recipe("cifar10")
print(profile.target, profile.precision, recipe.preprocessing.size)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    work = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(work / "dist"), str(REPO)], capture_output=True, text=True, timeout=600,
                           cwd=work)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((work / "dist").glob("deploykit-*.whl"))
    site = work / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return site


def test_profiles_and_recipes_ship_in_the_wheel(installed: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"  # no targets/ or calib/ here, and not the checkout
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed)
    done = subprocess.run([sys.executable, "-c", CHECK, str(installed)], cwd=outside, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["openvino", "int8", "32"]
