"""Shared test configuration: seeds, the `gpu` marker, and the device list."""

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def devices():
    """Devices the parity suite runs on: cpu always, cuda when present (RCKA_TEST_DEVICES overrides)."""
    env = os.environ.get("RCKA_TEST_DEVICES")
    if env:
        return env.split(",")
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
