"""The NVIDIA driver against the CUDA builds of the installed wheels, checked when training starts.

CUDA 13 wheels (torch +cu130, nvidia-dali-cuda130, cupy-cuda13x: requirements.txt) need driver
>= 580.65.06; CUDA 12 wheels need >= 525.60.13 (CUDA's minor-version compatibility). Under an older
driver torch simply sees no GPU, so `--device auto` would train on the CPU without a word:
`check_driver` stops first with one line naming both versions and the remedy.

    check_driver(torch.version.cuda)          # raises errors.RunFailure when the driver is too old
    device_summary("auto", device)            # 'cpu (--device auto fell back to the CPU: <why>)'
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

from errors import RunFailure

DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")  # written by the NVIDIA kernel module
# The oldest Linux driver each CUDA major release runs on (CUDA toolkit release notes, table 2).
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
WHEEL_CUDA = re.compile(r"(?:nvidia-dali-cuda|cupy-cuda)(1\d)[0-9x]")  # nvidia-dali-cuda130, cupy-cuda12x


def driver_version(version_file: Path | None = None) -> str | None:
    """The loaded NVIDIA kernel module's version (e.g. '535.104.05'), None without one."""
    try:
        text = (version_file or DRIVER_VERSION_FILE).read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module.*?\s(\d+\.\d+(?:\.\d+)?)\s", text)
    return found.group(1) if found else None


def wheel_cuda_builds(torch_cuda: str | None) -> dict[str, int]:
    """The CUDA major version of each installed CUDA wheel: torch (its `torch.version.cuda`), DALI, CuPy."""
    builds = {"torch": int(torch_cuda.split(".")[0])} if torch_cuda else {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if found := WHEEL_CUDA.fullmatch(name):
            builds[name] = int(found.group(1))
    return builds


def _as_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def check_driver(torch_cuda: str | None, version_file: Path | None = None) -> None:
    """Raise RunFailure when the NVIDIA driver is older than the installed CUDA wheels need; nothing
    on a machine without an NVIDIA driver or without CUDA wheels."""
    driver = driver_version(version_file)
    builds = wheel_cuda_builds(torch_cuda)
    if driver is None or not builds:
        return
    cuda = max(builds.values())
    need = MIN_DRIVER.get(cuda)
    if need is None or _as_tuple(driver) >= _as_tuple(need):
        return
    wheels = ", ".join(name for name, major in builds.items() if major == cuda)
    fits = [major for major, least in MIN_DRIVER.items() if _as_tuple(driver) >= _as_tuple(least)]
    instead = f", or use the CUDA {max(fits)} wheels (docker/README.md: --build-arg CUDA={max(fits)})" \
        if fits else ""
    raise RunFailure(f"NVIDIA driver {driver} is older than {need}, which the CUDA {cuda} wheels need "
                     f"({wheels}): upgrade the driver to >= {need}{instead}")


def cpu_fallback_reason(torch_cuda: str | None, version_file: Path | None = None) -> str:
    """Why torch found no CUDA device (said when `--device auto` falls back to the CPU)."""
    if not torch_cuda:
        return "torch is a CPU-only build"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "CUDA_VISIBLE_DEVICES hides every GPU"
    if driver_version(version_file) is None:
        return "no NVIDIA driver is loaded"
    return "the NVIDIA driver reports no usable GPU"


def device_summary(choice: str, device: object) -> str:
    """The device for the run's summary line; `--device auto` on the CPU also says why."""
    if choice != "auto" or str(device) != "cpu":
        return str(device)
    import torch

    return f"cpu (--device auto fell back to the CPU: {cpu_fallback_reason(torch.version.cuda)})"
