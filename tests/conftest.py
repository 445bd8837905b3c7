"""Shared fixtures: the tiny zoo architecture, a random-init model, generated data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `make test` runs two pytest-xdist workers on a 2-core machine: each keeps to one core, and so do
# the CLI processes it starts (PyTorch and, via `engines.runners.omp_threads`, ONNX Runtime read
# this), instead of four spinning thread pools on two cores.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = "1"

# Property tests check results, not speed (speed is for benchmarks/): hypothesis's per-example
# deadline failed on a busy 2-core CI machine when a first example ran 330 ms against 200.
settings.register_profile("clip-audit", deadline=None)
settings.load_profile("clip-audit")

from auditor.zoo.build import CONFIG_PATH  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def engine_cache(tmp_path_factory) -> Path:
    """Engines built by the tests go to a temporary cache, not the user's."""
    folder = tmp_path_factory.mktemp("engines")
    os.environ["CLIP_AUDIT_ENGINE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_arch() -> Path:
    """The zoo's open_clip config (ViT 64 px, patch 16, 4 layers; text width 64)."""
    return CONFIG_PATH


@pytest.fixture(scope="session")
def random_model(tiny_arch: Path):
    """A random-init tiny CLIP (fixed seed), in eval mode."""
    import torch

    from auditor.models import build_model, resolve_arch

    torch.manual_seed(1234)
    return build_model(resolve_arch(tiny_arch))


@pytest.fixture(scope="session")
def random_checkpoint(random_model, tmp_path_factory) -> Path:
    from auditor.models import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "random.safetensors"
    save_checkpoint(random_model, path)
    return path


@pytest.fixture(scope="session")
def test_data(tmp_path_factory) -> Path:
    """Clean held-out zoo scenes, 20 per class, as an ImageFolder."""
    from auditor.zoo.build import write_test_data

    return write_test_data(tmp_path_factory.mktemp("data") / "test", per_class=20)
