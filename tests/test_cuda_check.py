"""The start-up checks of the GPU set-up: the NVIDIA driver against the installed CUDA wheels (with a
faked driver version), and what `--device auto` says when it falls back to the CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import cuda_check
import train
from errors import RunFailure

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.args={depth: 1, decoder_depth: 1}", "train.batch_size=8", "data.workers=0", "train.epochs=1",
        "train.steps_per_epoch=1", "train.warmup_epochs=0", "log.mlflow=false"]


def fake_driver(folder: Path, version: str, open_module: bool = False) -> Path:
    """A /proc/driver/nvidia/version as the kernel module writes it."""
    module = "Open Kernel Module for x86_64" if open_module else "x86_64 Kernel Module"
    path = folder / "version"
    path.write_text(f"NVRM version: NVIDIA UNIX {module}  {version}  Release Build  (dvs-builder)  "
                    "Tue Jul  1 00:00:00 UTC 2025\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    return path


def as_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@pytest.mark.parametrize("driver", ["470.256.02", "525.60.13", "535.104.05", "570.124.06", "580.65.06",
                                    "590.12"])
@pytest.mark.parametrize("torch_cuda", ["12.8", "13.0"])
@pytest.mark.parametrize("open_module", [False, True])
def test_the_driver_is_refused_exactly_when_older_than_the_wheels_need(tmp_path, driver, torch_cuda,
                                                                      open_module):
    version_file = fake_driver(tmp_path, driver, open_module)
    assert cuda_check.driver_version(version_file) == driver
    cuda = max(cuda_check.wheel_cuda_builds(torch_cuda).values())  # DALI or CuPy may ask for more
    need = cuda_check.MIN_DRIVER[cuda]
    if as_tuple(driver) >= as_tuple(need):
        cuda_check.check_driver(torch_cuda, version_file)
        return
    with pytest.raises(RunFailure) as failure:
        cuda_check.check_driver(torch_cuda, version_file)
    message = str(failure.value)
    assert "\n" not in message
    assert f"NVIDIA driver {driver} is older than {need}" in message and f"CUDA {cuda} wheels" in message
    assert f"upgrade the driver to >= {need}" in message
    if as_tuple(driver) >= as_tuple(cuda_check.MIN_DRIVER[12]):
        assert "use the CUDA 12 wheels (docker/README.md: --build-arg CUDA=12)" in message


def test_no_driver_or_no_cuda_wheel_is_not_checked(tmp_path, monkeypatch):
    cuda_check.check_driver("13.0", tmp_path / "absent")  # a machine without the NVIDIA kernel module
    monkeypatch.setattr(cuda_check.metadata, "distributions", lambda: [])
    cuda_check.check_driver(None, fake_driver(tmp_path, "450.80.02"))  # a CPU-only torch and nothing else


def test_training_stops_with_one_line_under_a_driver_too_old(tmp_path, random_image_folder, monkeypatch,
                                                             capsys):
    images = random_image_folder(tmp_path / "images", 8)
    monkeypatch.setattr(cuda_check, "DRIVER_VERSION_FILE", fake_driver(tmp_path, "535.104.05"))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(SystemExit) as stop:
        train.main(["--config", str(ROOT / "configs" / "demo.yaml"), f"data.path={images}",
                    f"log.runs_root={tmp_path / 'runs'}", *TINY])
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: NVIDIA driver 535.104.05 is older than 580.65.06")
    assert not (tmp_path / "runs" / "demo").exists()


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_the_summary_line_says_why_auto_chose_the_cpu(tmp_path, random_image_folder, caplog, device):
    images = random_image_folder(tmp_path / "images", 8)
    with caplog.at_level(logging.INFO, logger="train"):
        train.main(["--config", str(ROOT / "configs" / "demo.yaml"), f"data.path={images}",
                    f"log.runs_root={tmp_path / 'runs'}", f"--device={device}", *TINY])
    summary = next(line for line in caplog.messages if "epochs x" in line)
    reason = cuda_check.cpu_fallback_reason(torch.version.cuda)
    if torch.cuda.is_available():
        assert "fell back" not in summary
    elif device == "auto":
        assert summary.endswith(f"fp32 on cpu (--device auto fell back to the CPU: {reason})"), summary
    else:
        assert summary.endswith("fp32 on cpu"), summary
