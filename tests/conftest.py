"""Shared pytest set-up: the GPU skip rule, temporary data caches and small fixtures.

The project is installed in editable mode (scripts/setup.sh), so its packages import from anywhere.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


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


@pytest.fixture(scope="session", autouse=True)
def _data_caches_in_a_temporary_folder(tmp_path_factory):
    """Manifests, .beton files and pattern banks go to a folder deleted with the session (where a
    test does not set COLORMAE_CACHE)."""
    import os

    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: identical results, and no OpenMP spinning on shared CPUs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[401, 403])
def refusing_server(request) -> str:
    """A server that answers every request as MLflow's basic-auth app answers a wrong password (or a
    user without the permission): its address."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def refuse(self):
            body = b"You are not authenticated. Please see https://www.mlflow.org/docs/latest/auth/index.html"
            self.send_response(request.param)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_DELETE = refuse

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(autouse=True)
def _no_outside_tracking_server(monkeypatch):
    """Tests use their own MLflow stores, never a server named in the caller's environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _write_random_pngs(root: Path, per_class: int) -> Path:
    """Classes `a` and `b` of `per_class` random 32x32 RGB PNGs each (seeded); returns `root`."""
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index}.png")
    return root


@pytest.fixture(scope="session")
def random_image_folder() -> Callable[[Path, int], Path]:
    """Writes a tiny two-class image folder: `random_image_folder(root, per_class)`."""
    return _write_random_pngs
