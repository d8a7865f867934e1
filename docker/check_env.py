"""The image's environment check: the pinned packages import, and each GPU stack runs on the GPU.

    docker run --rm --gpus all colormae python docker/check_env.py --require-gpu

Without a GPU the same checks run on the CPU (DALI decodes on the CPU, CuPy is reported absent).
Prints one JSON object; exits 1 naming the first check that failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import runpy
import sys
from pathlib import Path

import numpy as np

# The loader backends' table, read by path: the image runs this file without installing the project.
BACKEND_TABLE = runpy.run_path(str(Path(__file__).resolve().parents[1] / "pipelines" / "backends.py"))
PACKAGES = ("torch", "torchvision", "timm", "numpy", "mlflow",
            *BACKEND_TABLE["optional_packages"]().values(), "cupy-cuda13x", "psycopg2-binary")


def installed_version(name: str) -> str | None:
    """The distribution's version; None when it is not installed (a missing package is reported by the
    check of its stack, not here)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_check(gpu: bool) -> str:
    """A matrix product on the device; the CUDA build and device name."""
    import torch

    device = "cuda" if gpu else "cpu"
    x = torch.ones(64, 64, device=device)
    assert (x @ x).sum().item() == 64**3
    return f"cuda {torch.version.cuda}, {torch.cuda.get_device_name() if gpu else 'cpu'}"


def cupy_check(gpu: bool) -> str:
    """A reduction on the GPU (the mask stage's array module there)."""
    import cupy

    if not gpu:
        return f"imported; no GPU (cupy.cuda.is_available() = {cupy.cuda.is_available()})"
    assert int(cupy.arange(10).sum()) == 45
    return f"runtime {cupy.cuda.runtime.runtimeGetVersion()}"


def dali_check(gpu: bool) -> str:
    """Decode a small JPEG the way the DALI loader does: nvJPEG ("mixed") on a GPU, else the CPU."""
    from nvidia.dali import fn, pipeline_def
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 30, 90)).save(buffer, format="JPEG")
    encoded = np.frombuffer(buffer.getvalue(), dtype=np.uint8)

    @pipeline_def(batch_size=2, num_threads=1, device_id=0 if gpu else None)
    def decode():
        jpegs = fn.external_source(source=lambda: [encoded, encoded], batch=True)
        return fn.decoders.image(jpegs, device="mixed" if gpu else "cpu")

    pipe = decode()
    pipe.build()
    (images,) = pipe.run()
    image = np.asarray(images.as_cpu()[0] if gpu else images[0])
    assert image.shape == (16, 24, 3) and abs(int(image[..., 0].mean()) - 200) < 10
    return "nvjpeg decode on the GPU" if gpu else "decode on the CPU"


def ffcv_check(gpu: bool) -> str:
    """ffcv's compiled extension (linked to libturbojpeg and OpenCV) and the classes the loader uses."""
    from ffcv import libffcv
    from ffcv.loader import Loader
    from ffcv.transforms import ToDevice

    assert callable(libffcv.imdecode) and Loader and ToDevice
    return "compiled extension loads"


CHECKS = {"torch": torch_check, "cupy": cupy_check, "dali": dali_check, "ffcv": ffcv_check}


def main(argv: list[str] | None = None) -> None:
    """Run every check; print a JSON report; exit 1 on the first failure."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--require-gpu", action="store_true", help="fail when no CUDA device is visible")
    args = parser.parse_args(argv)

    import torch

    gpu = torch.cuda.is_available()
    report = {"versions": {name: installed_version(name) for name in PACKAGES}, "gpu": gpu}
    if args.require_gpu and not gpu:
        sys.exit("check_env: no CUDA device visible (run the container with --gpus all)")
    for name, check in CHECKS.items():
        try:
            report[name] = check(gpu)
        except Exception as error:
            print(json.dumps(report, indent=2))
            sys.exit(f"check_env: {name} failed on {'the GPU' if gpu else 'the CPU'}: {error!r}")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
