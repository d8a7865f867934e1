"""scripts/setup.sh installs what each command needs, as root and as another user.

The script runs for real in a copy of the checkout; only the outside world is replaced by recording
stand-ins on PATH: `dpkg` (which Debian packages are present), `apt-get`, `id` (the user), and the
.venv's `pip` and `python` (no download, no virtual environment).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"docker.io", "docker-compose", "debootstrap", "postgresql", "chromium", "libopencv-dev"}
TRAIN = {"dataset-fashion-mnist"}
STUB = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
{body}
"""


@pytest.fixture
def checkout(tmp_path) -> Path:
    """The set-up's files in a fresh folder, with recording stand-ins for the system's tools."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", repo / "scripts")
    for path in [*ROOT.glob("requirements*.txt"), ROOT / "pyproject.toml"]:
        shutil.copy(path, repo)
    log = tmp_path / "calls.log"
    stubs = {"dpkg": 'grep -qx "$2" "{present}"', "apt-get": "", "id": 'echo "$FAKE_UID"'}
    for name, body in stubs.items():
        write_stub(tmp_path / "bin" / name, log, body.format(present=tmp_path / "present"))
    for name in ("python", "pip"):
        write_stub(repo / ".venv" / "bin" / name, log, "")
    return repo


def write_stub(path: Path, log: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STUB.format(log=log, body=body))
    path.chmod(0o755)


def setup(repo: Path, level: str, uid: int, present: set[str]) -> tuple[subprocess.CompletedProcess, list]:
    """Run scripts/setup.sh LEVEL as user `uid` with only `present` Debian packages: (result, calls)."""
    tmp = repo.parent
    (tmp / "present").write_text("".join(f"{name}\n" for name in present))
    (tmp / "calls.log").write_text("")
    env = {"PATH": f"{tmp / 'bin'}:/usr/bin:/bin", "FAKE_UID": str(uid)}
    result = subprocess.run(["bash", "scripts/setup.sh", level], cwd=repo, env=env, capture_output=True,
                            text=True)
    return result, (tmp / "calls.log").read_text().splitlines()


def installed_by_apt(calls: list[str]) -> set[str]:
    """The packages that `apt-get install` was asked for."""
    words = [call.split() for call in calls if call.startswith("apt-get") and " install " in call]
    return {word for line in words for word in line[1:] if not word.startswith("-") and word != "install"}


def pip_requirements(calls: list[str]) -> list[str]:
    """The requirement files that pip installed, in order."""
    words = [call.split() for call in calls if call.startswith("pip install")]
    return [line[line.index("-r") + 1] for line in words if "-r" in line]


def test_train_as_root_installs_only_what_the_demo_needs(checkout):
    result, calls = setup(checkout, "train", 0, present=set())
    assert result.returncode == 0, result.stderr
    apt = installed_by_apt(calls)
    assert apt >= TRAIN and not apt & HEAVY
    assert pip_requirements(calls) == ["requirements.txt"]
    assert any(call.startswith("pip install") and "-e ." in call for call in calls)


def test_test_level_brings_the_services_the_tests_start(checkout):
    result, calls = setup(checkout, "test", 0, present=set())
    assert result.returncode == 0, result.stderr
    assert HEAVY | TRAIN | {"libturbojpeg0-dev", "pkg-config"} <= installed_by_apt(calls) | {"docker.io"}
    assert pip_requirements(calls) == ["requirements-dev.txt"]


def test_another_user_proceeds_when_the_packages_are_present(checkout):
    result, calls = setup(checkout, "train", 1000, present=TRAIN | {"python3-venv"})
    assert result.returncode == 0, result.stderr
    assert not installed_by_apt(calls) and pip_requirements(calls) == ["requirements.txt"]


def test_another_user_is_told_the_packages_and_the_command(checkout):
    result, calls = setup(checkout, "gpu", 1000, present={"pkg-config"})
    assert result.returncode == 1 and not pip_requirements(calls) and not installed_by_apt(calls)
    venv = [] if subprocess.run(["python3", "-c", "import ensurepip"]).returncode == 0 else ["python3-venv"]
    missing = " ".join(["dataset-fashion-mnist", *venv, "libturbojpeg0-dev", "libopencv-dev"])
    assert result.stderr.splitlines() == [
        f"setup: missing Debian packages: {missing}",
        f"setup: install them, then run this again:  sudo apt-get install -y {missing}"]


def test_a_second_run_is_free_unless_a_higher_level_is_asked(checkout):
    setup(checkout, "train", 0, present=set())
    result, calls = setup(checkout, "train", 0, present=set())
    assert result.returncode == 0 and calls == []
    _, calls = setup(checkout, "gpu", 0, present=set())
    assert pip_requirements(calls) == ["requirements-loaders.txt"]
    _, calls = setup(checkout, "train", 0, present=set())
    assert calls == []  # the gpu level holds the train level


@pytest.mark.parametrize(("target", "level"), [("train", "train"), ("test", "test"), ("setup-gpu", "gpu")])
def test_each_make_target_asks_for_its_own_level(target, level):
    plan = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"bash scripts/setup.sh {level}" in plan
