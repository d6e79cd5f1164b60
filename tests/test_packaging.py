"""The package's metadata: pyproject.toml (PEP 621) with the floors the code needs, and setup.py a shim."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the metadata is read by pip on 3.10 too


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _floors() -> dict[str, str]:
    floors = {}
    for requirement in _project()["dependencies"]:
        name, spec = re.match(r"([A-Za-z0-9_.-]+)(.*)", requirement).groups()
        floors[name] = spec
    return floors


def test_the_metadata_lives_in_pyproject_and_setup_py_is_a_shim():
    setup = (ROOT / "setup.py").read_text()
    assert "setup()" in setup and "install_requires" not in setup and "name=" not in setup
    project = _project()
    assert project["name"] == "hlb-gpt"
    assert project["scripts"] == {"hlb-gpt": "hlb_gpt.cli:main"}
    assert "pytest-xdist>=3.0" in project["optional-dependencies"]["test"]


def test_every_requested_library_has_a_floor_and_none_but_safetensors_a_cap():
    floors = _floors()
    for name in ("torch", "datasets", "tiktoken", "click", "tqdm", "wandb", "scipy", "matplotlib"):
        assert floors[name].startswith(">="), name
    assert [name for name, spec in floors.items() if "<" in spec] == ["safetensors"]


def test_the_wandb_and_scipy_floors_are_the_versions_with_what_the_code_calls():
    # reinit="finish_previous" (one wandb run per run of a sweep in one process) came with wandb 0.19.10;
    # scipy.stats.false_discovery_control (compare's Benjamini-Hochberg q-values) with scipy 1.11.
    floors = _floors()
    assert floors["wandb"] == ">=0.19.10"
    assert floors["scipy"] == ">=1.11"
    import scipy.stats

    assert hasattr(scipy.stats, "false_discovery_control")


def test_the_bundled_assets_are_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert data == {"hlb_gpt": ["assets/*", "assets/*/*"]}
