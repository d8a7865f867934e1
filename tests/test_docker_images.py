"""The images built and run on a real Docker engine (marked `docker`).

Both targets of docker/Dockerfile are built from this checkout with BuildKit on a Debian bookworm
base: $COLORMAE_BASE_IMAGE, else the local base that docker/local-base.sh makes (no registry needed).
The machine's CA bundle goes in as the build secret, so builds work behind a TLS-intercepting proxy.
Containers use the host's network (services on 127.0.0.1) or none at all. Skipped with the reason
where no engine answers or the tests do not run as root (they hand folders to uid 1000).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_mlflow_postgres import ADMIN, free_port, healthy, status_of
from test_mlflow_postgres import postgres_uri as postgres_uri  # the fixture: PostgreSQL on 127.0.0.1

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = os.environ.get("COLORMAE_BASE_IMAGE", "colormae-base:bookworm")
CA_BUNDLE = Path(os.environ.get("COLORMAE_BUILD_CA", "/etc/ssl/certs/ca-certificates.crt"))
TAG = {"trainer": "colormae:test", "mlflow": "colormae-mlflow:test"}
UID = 1000  # the images' user
# The demo for a few steps on a tiny dataset; every run of these tests adds its own settings.
DEMO = ["--config", "configs/demo.yaml", "data.path=/data", "data.workers=0", "train.batch_size=4",
        "train.warmup_epochs=0", "train.steps_per_epoch=4", "log.every_steps=1", "log.run_name=demo"]
ENV = {**os.environ, "DOCKER_BUILDKIT": "1"}
# What the OCI labels say (docker/README.md passes the real commit, date and repository).
LABELS = {"GIT_COMMIT": "0123456789abcdef-test", "CREATED": "2026-01-02T03:04:05Z",
          "SOURCE": "https://example.org/colormae.git"}


def docker_client() -> tuple[str | None, str]:
    """A client that builds with BuildKit (docker with buildx, or Debian's 20.10 client), or why none."""
    candidates = dict.fromkeys(path for path in (shutil.which("docker"), "/usr/bin/docker") if path)
    for client in candidates:
        if subprocess.run([client, "buildx", "version"], capture_output=True).returncode == 0:
            return client, ""
        version = subprocess.run([client, "version", "--format", "{{.Client.Version}}"],
                                 capture_output=True, text=True).stdout
        if re.match(r"(1\d|20)\.", version):  # BuildKit built into the client before 23.0
            return client, ""
    if not candidates:
        return None, "no docker client (scripts/setup.sh installs docker.io as root)"
    return None, "the docker client cannot build with BuildKit (install buildx or Debian's docker.io)"


def why_skip() -> str:
    """Empty when an engine answers and we are root; else the reason to skip."""
    if os.geteuid() != 0:
        return "needs root: the runs folders are handed to the images' uid 1000"
    client, reason = docker_client()
    if client is None:
        return reason
    if subprocess.run([client, "info"], capture_output=True).returncode != 0:
        return "no Docker engine answers (start one: dockerd --bridge=none --iptables=false; .ci/run does)"
    return ""


REASON = why_skip()
CLIENT = docker_client()[0]
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(3600),
              pytest.mark.skipif(bool(REASON), reason=REASON)]


def docker(*args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run the docker client; fail the test with its output when `check` and it fails."""
    result = subprocess.run([CLIENT, *args], capture_output=True, text=True, timeout=timeout, env=ENV)
    if check and result.returncode:
        pytest.fail(f"docker {' '.join(args[:2])} failed ({result.returncode}):\n"
                    f"{(result.stdout + result.stderr)[-4000:]}")
    return result


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """Both targets built from the checkout (a warm cache rebuilds only the code layers)."""
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        if BASE_IMAGE != "colormae-base:bookworm":
            pytest.fail(f"COLORMAE_BASE_IMAGE={BASE_IMAGE}: no such image")
        subprocess.run(["bash", str(ROOT / "docker" / "local-base.sh")], check=True, timeout=900)
    secret = ["--secret", f"id=ca_bundle,src={CA_BUNDLE}"] if CA_BUNDLE.is_file() else []
    for target, tag in TAG.items():
        labels = [f"--build-arg={key}={value}" for key, value in LABELS.items()]
        docker("build", "--network", "host", "-f", "docker/Dockerfile", "--target", target,
               "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", *labels, *secret, "-t", tag, str(ROOT),
               timeout=3000)
    docker("image", "prune", "--force", "--filter", "label=colormae.target")  # earlier builds' leftovers
    return TAG


def test_both_images_build_and_run_as_uid_1000_without_the_ca_bundle(images):
    for tag in images.values():
        assert docker("image", "inspect", "--format", "{{.Config.User}}", tag).stdout.strip() == "1000:1000"
        found = docker("run", "--rm", "--network=none", "--user=0", "--entrypoint=find", tag, "/", "-xdev",
                       "-name", "ca_bundle").stdout
        assert found == "", f"{tag} keeps the build secret: {found}"
    versions = docker("run", "--rm", "--network", "none", images["trainer"], "python", "-c",
                      "import sys, torch, ffcv.libffcv; print(sys.version_info[:2], torch.__version__)")
    assert versions.stdout.split() == ["(3,", "11)", torch.__version__]


def test_labels_say_what_each_image_is_and_the_trainer_holds_no_compiler(images):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for tag in images.values():
        labels = json.loads(docker("image", "inspect", "--format", "{{json .Config.Labels}}", tag).stdout)
        oci = {key.removeprefix("org.opencontainers.image."): value for key, value in labels.items()}
        assert {key: oci[key] for key in ("revision", "created", "source", "version")} == {
            "revision": LABELS["GIT_COMMIT"], "created": LABELS["CREATED"], "source": LABELS["SOURCE"],
            "version": version}
    health = docker("image", "inspect", "--format", "{{json .Config.Healthcheck}}", images["mlflow"]).stdout
    assert "mlflow-server" in health and "health" in health
    found = docker("run", "--rm", "--network=none", "--entrypoint=sh", images["trainer"], "-c",
                   "command -v gcc cc g++ c++ clang make; ls /usr/include/python3* /usr/include/opencv4 "
                   "2>/dev/null; true").stdout
    assert found == "", f"the trainer keeps build tools or headers: {found}"
    hints = docker("run", "--rm", "--network=none", "--workdir=/tmp", "--entrypoint=colormae-train",
                   images["trainer"], "--config", "demo.yaml", "--print-config").stdout
    assert "preset: demo" in hints  # the console commands and the shipped configs, from any folder


@pytest.fixture
def dataset(tmp_path, random_image_folder) -> Path:
    """A tiny image folder for /data, readable by every user."""
    return random_image_folder(tmp_path / "data", 8)


@pytest.fixture
def runs(tmp_path) -> Path:
    """An empty runs folder owned by the images' user."""
    folder = tmp_path / "runs"
    folder.mkdir()
    os.chown(folder, UID, UID)
    return folder


@pytest.fixture
def containers() -> Iterator[list[str]]:
    """Names of the containers a test starts; all removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        docker("rm", "--force", name, check=False)


def start_trainer(image: str, dataset: Path, runs: Path, names: list[str], *flags: str,
                  network: str = "none", env: dict[str, str] | None = None) -> str:
    """`docker run -d` of the trainer image: read-only container filesystem, /data read-only, /runs."""
    name = f"colormae-test-{uuid.uuid4().hex[:8]}"
    names.append(name)
    options = [f"--env={key}={value}" for key, value in (env or {}).items()]
    docker("run", "--detach", "--name", name, f"--network={network}", "--read-only", "--tmpfs", "/tmp",
           "--volume", f"{dataset}:/data:ro", "--volume", f"{runs}:/runs", *options, image, *DEMO, *flags)
    return name


def finish(name: str, timeout: float = 600) -> tuple[int, str]:
    """Wait for the container to exit: (exit status, its log)."""
    status = int(docker("wait", name, timeout=timeout).stdout.strip())
    return status, logs(name)


def logs(name: str) -> str:
    """The container's output so far (train.py logs to stderr)."""
    result = docker("logs", name)
    return result.stdout + result.stderr


def test_demo_runs_as_uid_1000_and_writes_only_to_runs(images, dataset, runs, containers):
    before = sorted(path.relative_to(dataset) for path in dataset.rglob("*"))
    name = start_trainer(images["trainer"], dataset, runs, containers, "train.epochs=1")
    status, log = finish(name)
    assert status == 0, log[-4000:]
    assert (runs / "demo" / "checkpoint-last.pth").is_file() and (runs / "mlflow.db").is_file()
    owners = {path: (path.lstat().st_uid, path.lstat().st_gid) for path in [runs, *runs.rglob("*")]}
    foreign = [path for path, owner in owners.items() if owner != (UID, UID)]
    assert not foreign, f"not owned by uid {UID}: {foreign[:5]}"
    assert docker("diff", name).stdout == "", "the container wrote outside /runs"
    assert sorted(path.relative_to(dataset) for path in dataset.rglob("*")) == before


def test_docker_stop_saves_and_exits_0_and_the_same_run_resumes(images, dataset, runs, containers):
    from mlflow.tracking import MlflowClient

    epochs, flags = 3, ["train.epochs=3"]
    first = start_trainer(images["trainer"], dataset, runs, containers, *flags)
    deadline = time.monotonic() + 600
    while not re.search(r"step \d+ \(epoch", logs(first)):  # training runs: stop it
        running = docker("inspect", "-f", "{{.State.Running}}", first).stdout.strip() == "true"
        assert running and time.monotonic() < deadline, logs(first)[-3000:]
        time.sleep(0.5)
    docker("stop", "--time", "120", first)
    status, log = finish(first)
    assert status == 0 and "stop signal: saved" in log, log[-4000:]
    saved = torch.load(runs / "demo" / "checkpoint-last.pth", weights_only=True)["step"]
    assert 1 <= saved < epochs * 4

    second = start_trainer(images["trainer"], dataset, runs, containers, *flags)
    status, log = finish(second)
    assert status == 0 and re.search(rf"resuming from .* step {saved}\b", log), log[-4000:]
    assert torch.load(runs / "demo" / "checkpoint-last.pth", weights_only=True)["step"] == epochs * 4
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("colormae-demo").experiment_id])
    steps = sorted(metric.step for metric in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == list(range(1, epochs * 4 + 1)), "one MLflow run, each step logged once"


@pytest.fixture
def mlflow_container(images, postgres_uri, containers) -> str:
    """The MLflow image on 127.0.0.1 (host network) against the test PostgreSQL, basic auth on; its URL."""
    port, name = free_port(), f"colormae-test-mlflow-{uuid.uuid4().hex[:8]}"
    containers.append(name)
    env = {"MLFLOW_BACKEND_STORE_URI": postgres_uri, "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port),
           "MLFLOW_WORKERS": "1", "MLFLOW_AUTH": "true", "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0],
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key"}
    docker("run", "--detach", "--name", name, "--network", "host",
           *[f"--env={key}={value}" for key, value in env.items()], images["mlflow"])
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while not healthy(url):
        running = docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true"
        if not running or time.monotonic() > deadline:
            pytest.fail(f"the MLflow container did not start:\n{logs(name)[-3000:]}")
        time.sleep(1)
    return url


def test_trainer_container_logs_to_the_mlflow_container_with_basic_auth(
        images, mlflow_container, dataset, runs, containers, monkeypatch):
    from mlflow.tracking import MlflowClient

    url = mlflow_container
    assert status_of(url) == 401 and status_of(url, (ADMIN[0], "wrong-password-123")) == 401
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    client = MlflowClient(tracking_uri=url)
    # The server's first writes (migrations, the admin's permissions) can outlast the trainer's
    # short HTTP timeout on a busy machine; make them here.
    experiment_id = client.create_experiment("docker-images")
    env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": ADMIN[0],
           "MLFLOW_TRACKING_PASSWORD": ADMIN[1]}
    name = start_trainer(images["trainer"], dataset, runs, containers, "train.epochs=1",
                         "log.experiment=docker-images", network="host", env=env)
    status, log = finish(name)
    assert status == 0 and "tracking:" not in log, log[-4000:]

    (run,) = client.search_runs([experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["data.path"] == "../data"  # beside /runs
    steps = sorted(metric.step for metric in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == [1, 2, 3, 4]
    assert {item.path for item in client.list_artifacts(run.info.run_id, "figures")} == {"figures/masks.png"}
    assert not (runs / "mlflow.db").exists(), "the run went to the local store, not the server"
    server = next(name for name in containers if "mlflow" in name)
    deadline = time.monotonic() + 120  # the image's own HEALTHCHECK finds the server healthy
    while (health := docker("inspect", "-f", "{{.State.Health.Status}}", server).stdout.strip()) != "healthy":
        assert health == "starting" and time.monotonic() < deadline, f"health: {health}"
        time.sleep(2)
