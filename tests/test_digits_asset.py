"""The shipped digits array: scikit-learn's digits, bit for bit, without importing scikit-learn."""

import ast
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_gym.digits import DIGITS_ARRAY, load_digits_dataset

ROOT = Path(__file__).resolve().parents[1]
# sha256 of images.tobytes() + labels.tobytes(), as scripts/make_digits_asset.py prints it
DIGITS_SHA256 = "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"
TEST_SET_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # optdigits.tes, per digit (UCI)


def _shipped():
    with np.load(DIGITS_ARRAY, allow_pickle=False) as data:
        assert sorted(data.files) == ["images", "labels"]
        return data["images"], data["labels"]


def test_the_shipped_array_is_the_pinned_one_and_small():
    images, labels = _shipped()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and int(images.max()) == 16
    assert labels.shape == (1797,) and labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == TEST_SET_COUNTS
    assert hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest() == DIGITS_SHA256
    assert DIGITS_ARRAY.stat().st_size < 100_000


@pytest.mark.parametrize("size", [8, 16, 12])
def test_load_digits_dataset_equals_what_scikit_learn_gave(size):
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    data = sklearn_datasets.load_digits()
    expected = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)  # the former loader
    if size != 8:
        expected = F.interpolate(expected, size=(size, size), mode="bilinear", align_corners=False)
    images, labels = load_digits_dataset(size)
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.equal(images, expected.clamp(0.0, 1.0))
    assert torch.equal(labels, torch.from_numpy(data.target.astype(np.int64)))


def test_digits_load_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # any `import sklearn…` now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    images, labels = load_digits_dataset(8)
    pixels, digits = _shipped()
    assert torch.equal(images[:, 0] * 16, torch.from_numpy(pixels.astype(np.float32)))
    assert torch.equal(labels, torch.from_numpy(digits.astype(np.int64)))


def test_no_library_module_imports_scikit_learn():
    offenders = []
    for package in ("diffusion_gym", "agents"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "sklearn"]
    assert offenders == []


def test_the_array_is_package_data_and_scikit_learn_no_dependency():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir = ROOT / "diffusion_gym"
    patterns = project["tool"]["setuptools"]["package-data"]["diffusion_gym"]
    shipped = {path for pattern in patterns for path in package_dir.glob(pattern)}
    assert DIGITS_ARRAY in shipped and DIGITS_ARRAY.with_name("README.md") in shipped
    requirements = [r.replace(" ", "").lower() for r in project["project"]["dependencies"]]
    assert not any(r.startswith(("scikit-learn", "sklearn")) for r in requirements)
    assert "gymnasium>=1.4" in requirements  # AutoresetMode needs >= 1.1; 1.4 is what CI installs and tests


def test_every_declared_floor_is_met_by_what_ci_installs():
    """The dependency floors (set to the versions CI installed when they were written) are met here."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in ("lora", "clip", "sb3") for r in project["optional-dependencies"][group]]
    for text in [*project["dependencies"], *extras]:
        requirement = Requirement(text)
        installed = version(requirement.name)
        assert requirement.specifier.contains(installed), f"{text}: installed {installed}"
