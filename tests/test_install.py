"""The project as a library of its field: `pip install .` with version ranges and extras, the configs in
the wheel, console commands, and hints that run as printed from any folder.

The wheel is built from a copy of the checkout and installed (without dependencies) into a fresh
virtual environment that sees this environment's packages; its commands then run from another folder.
"""

from __future__ import annotations

import ast
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import cli

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = ("dali", "ffcv", "server", "dev")


def declared() -> dict[str, Requirement]:
    """Every requirement of the project and its extras, by normalised name."""
    extras = PYPROJECT["optional-dependencies"]
    lines = [*PYPROJECT["dependencies"], *(line for extra in EXTRAS for line in extras[extra])]
    return {canonicalize_name(req.name): req for req in map(Requirement, lines)}


def locked(name: str) -> dict[str, str]:
    """The pins of requirements*.txt (name -> version), the lock that the set-up installs."""
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            pins |= locked(line[3:])
        elif line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = str(req.specifier).removeprefix("==")
    return pins


def test_dependencies_are_ranges_with_the_four_extras():
    assert set(EXTRAS) <= set(PYPROJECT["optional-dependencies"])
    for name, req in declared().items():
        assert req.name == "colormae" or (req.specifier and "==" not in str(req.specifier)), \
            f"{name}: a range, not a pin (the lock is requirements*.txt)"


def test_the_lock_satisfies_the_ranges_and_covers_every_declared_package():
    pins, ranges = locked("requirements-dev.txt"), declared()
    for name, req in ranges.items():
        if name != "colormae":
            assert name in pins, f"{name} is declared in pyproject.toml but not locked in requirements*.txt"
            assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req}"


def third_party_imports() -> set[str]:
    """Top-level modules that the project's code (not its tests) imports from outside itself."""
    own = {path.stem if path.is_file() else path.name for path in ROOT.iterdir()}
    found = set()
    for path in ROOT.glob("*.py"):
        found |= _imports(path)
    for package in ("bench", "configs", "eval", "model", "noise", "pipelines", "docker"):
        for path in (ROOT / package).rglob("*.py"):
            found |= _imports(path)
    return {name for name in found - own if name not in sys.stdlib_module_names}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0
              and node.module}
    return {name.split(".")[0] for name in names}


def test_every_package_the_code_imports_is_declared():
    providers = metadata.packages_distributions()
    names = set(declared())
    for module in sorted(third_party_imports()):
        if module in ("skimage", "cupy"):  # a fallback photo source (pipelines.prepare); cupy-cuda13x
            continue
        dists = {canonicalize_name(dist) for dist in providers.get(module, [])}
        assert dists & names, f"`import {module}` ({', '.join(dists) or 'not installed'}) is not declared"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """bin/ of a fresh venv holding the project's wheel (built from a copy of the checkout); the
    dependencies come from this environment (a .pth line), nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    here = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
    (site / "this-environment.pth").write_text(here + "\n")
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", str(source)], check=True, env=clean_env())
    return venv / "bin"


def clean_env(path: str | None = None) -> dict[str, str]:
    """The environment without the checkout on the import path (the tests run with PYTHONPATH=root)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if path is not None:
        env["PATH"] = path
    return env


def in_elsewhere(bin_dir: Path, tmp_path: Path, code: str, path: str) -> str:
    """Run `code` with the installed project's python from an empty folder; its stdout."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    return subprocess.run([bin_dir / "python", "-c", code], cwd=elsewhere, env=clean_env(path),
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
def test_the_wheel_has_every_command_and_the_configs(installed, tmp_path):
    for name in cli.COMMANDS:
        assert (installed / name).is_file(), f"no console command {name}"
    out = subprocess.run([installed / "colormae-train", "--config", "demo.yaml", "--print-config"],
                         cwd=tmp_path, env=clean_env(), capture_output=True, text=True, check=True).stdout
    assert "preset: demo" in out  # configs/demo.yaml from the wheel, not from the checkout
    for name in ("colormae-knn", "colormae-compare", "colormae-export", "colormae-tracking"):
        usage = subprocess.run([installed / name, "--help"], cwd=tmp_path, env=clean_env(),
                               capture_output=True, text=True, check=True).stdout
        assert usage.startswith("usage:"), usage


@pytest.mark.slow
@pytest.mark.parametrize("on_path", [True, False])
def test_printed_hints_run_as_printed_from_another_folder(installed, tmp_path, on_path):
    path = os.pathsep.join([str(installed)] * on_path + ["/usr/bin", "/bin"])
    runs = tmp_path / "runs"
    runs.mkdir()
    hints = in_elsewhere(installed, tmp_path, "import tracking\n"
                         f"print(tracking.ui_command(tracking.default_tracking_uri({str(runs)!r})))\n"
                         f"t = tracking.Tracker.__new__(tracking.Tracker); t.offline_dir = 'runs/demo'; "
                         f"t.uri = 'sqlite:///x.db'; print(t.sync_command())\n"
                         "import cli; print(cli.command('colormae-knn', '--checkpoint', 'c.pth'))", path)
    for hint in hints.splitlines():
        words = shlex.split(hint)
        assert (words[0] == Path(words[0]).name) == on_path, hint  # by name only where PATH finds it
        assert not any(word.endswith(".py") for word in words), hint
        command = words[:2] if words[1] in ("ui", "sync") else words[:1]
        result = subprocess.run([*command, "--help"], cwd=tmp_path / "elsewhere", env=clean_env(path),
                                capture_output=True, text=True)
        assert result.returncode == 0, f"{hint}: {result.stderr}"
    ui, sync = (shlex.split(hint) for hint in hints.splitlines()[:2])
    assert ui[2] == str(runs.resolve()) and Path(sync[2]).is_absolute()  # folders hold from anywhere


def test_a_loader_left_out_of_the_install_is_named_with_its_set_up(monkeypatch):
    from errors import UserError
    from pipelines import LoaderConfig, build_loader

    # imports fail as if not installed, also of submodules an earlier test loaded
    loaded = [name for name in sys.modules if name.startswith(("ffcv.", "nvidia.dali."))]
    for module in {"ffcv", "nvidia.dali", *loaded}:
        monkeypatch.setitem(sys.modules, module, None)
    for loader in ("ffcv", "dali"):
        monkeypatch.delitem(sys.modules, f"pipelines.{loader}_loader", raising=False)
        with pytest.raises(UserError, match=rf"data.loader {loader} needs the package .*: make setup-gpu "
                                            rf"\(or pip install 'colormae\[{loader}\]'\)"):
            build_loader(LoaderConfig(loader=loader, data="unused", workers=0))
