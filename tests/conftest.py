"""Test setup: offline hubs, two threads, and the torchvision guard before anything imports timm."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import didbq  # noqa: E402,F401  (runs the torchvision guard)

torch.set_num_threads(2)
sys.path.insert(0, os.path.dirname(__file__))  # shared helpers that are not tests (tests/badfiles.py)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
