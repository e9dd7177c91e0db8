"""Shared fixtures: both Lightning flavours, and the ``gpu`` marker's skip."""

from __future__ import annotations

import importlib
import socket
from types import SimpleNamespace

import pytest
import torch

FLAVOURS = {"pytorch_lightning": "lightning_soup", "lightning": "lightning_soup.lightning"}


@pytest.fixture(params=sorted(FLAVOURS))
def flavour(request: pytest.FixtureRequest) -> SimpleNamespace:
    """``flavour.pl`` is the Lightning package; ``flavour.soup`` holds the callbacks bound to it."""
    pl = importlib.import_module("pytorch_lightning" if request.param == "pytorch_lightning" else "lightning.pytorch")
    soup = importlib.import_module(FLAVOURS[request.param])
    return SimpleNamespace(name=request.param, pl=pl, soup=soup)


@pytest.fixture
def free_port() -> int:
    """A TCP port nothing listens on, for one multi-process test's MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
