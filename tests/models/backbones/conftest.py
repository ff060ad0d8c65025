"""Session-wide tiny model folders (each ~0.1 s to write) shared by the backbone tests.

Tests must not modify these folders; copy one (``shutil.copytree``) to break it."""

import pytest


@pytest.fixture(scope="session")
def sd15_dir(tmp_path_factory):
    from spobench.models.backbones.testing import make_sd15_folder

    return make_sd15_folder(tmp_path_factory.mktemp("models") / "sd15")


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    from spobench.models.backbones.testing import make_sdxl_folder

    return make_sdxl_folder(tmp_path_factory.mktemp("models") / "sdxl")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from spobench.models.backbones.testing import make_tiny_folder

    return make_tiny_folder(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def offline(monkeypatch):
    """Hub access forbidden, whatever huggingface_hub read at import time."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
