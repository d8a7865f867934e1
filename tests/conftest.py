"""Shared pytest set-up: the repo root on sys.path and the GPU skip rule."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device on this machine; the CPU twin of this path is tested")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _no_outside_tracking_server(monkeypatch):
    """Tests use their own MLflow stores, never a server named in the caller's environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
