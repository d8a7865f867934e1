"""The compose stack's database path without Docker: PostgreSQL -> docker/mlflow-server.sh -> train.py.

A throw-away PostgreSQL cluster on 127.0.0.1 (the Debian `postgresql` package, installed by
scripts/setup.sh), the MLflow server started by the same script as the compose service with basic
auth on, and two short trainings logging to it at once over HTTP, one of them launched through
the image's entrypoint (torchrun, one CPU process).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DB_PASSWORD = "db-secret-7f3a"
ADMIN = ("admin", "admin-password-2b9c")  # the auth app wants at least 12 characters
STEPS = 3

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path:
    """The newest PostgreSQL server binaries of the Debian package (not on PATH there)."""
    versions = Path("/usr/lib/postgresql").glob("*/bin/initdb")
    candidates = sorted(versions, key=lambda path: int(path.parent.parent.name))
    if candidates:
        return candidates[-1].parent
    if initdb := shutil.which("initdb"):
        return Path(initdb).parent
    pytest.fail("PostgreSQL is not installed: run `bash scripts/setup.sh` as root (it installs `postgresql`)")


def as_db_owner(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: hand the command to the `postgres` account then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def run_or_fail(command: list[str], what: str, log: Path | None = None, **kwargs) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)
    if result.returncode:
        details = log.read_text()[-2000:] if log and log.exists() else ""
        pytest.fail(f"{what} failed ({result.returncode}): {result.stderr.strip()}\n{details}")


@pytest.fixture(scope="module")
def postgres_uri() -> Iterator[str]:
    """A fresh cluster on 127.0.0.1 with password auth and an `mlflow` database; SQLAlchemy URI."""
    bindir, port = postgres_bin(), free_port()
    workdir = Path(tempfile.mkdtemp(prefix="colormae-pg-"))
    data, log, password = workdir / "data", workdir / "postgres.log", workdir / "password"
    password.write_text(DB_PASSWORD)
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
        shutil.chown(password, "postgres")
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        run_or_fail(as_db_owner([str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "-E", "UTF8",
                                 f"--pwfile={password}", "--auth=scram-sha-256"]), "initdb")
        run_or_fail(as_db_owner([*pg_ctl, "-l", str(log), "-w", "-o", f"-h 127.0.0.1 -p {port} -k {workdir}",
                                 "start"]), "starting PostgreSQL", log)
        run_or_fail([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
                    "createdb", log, env={**os.environ, "PGPASSWORD": DB_PASSWORD})
        yield f"postgresql+psycopg2://mlflow:{DB_PASSWORD}@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(as_db_owner([*pg_ctl, "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres_uri, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """docker/mlflow-server.sh against the cluster, basic auth on -> (URL, artifacts folder)."""
    home, port = tmp_path_factory.mktemp("mlflow"), free_port()
    artifacts = home / "artifacts"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_BACKEND_STORE_URI": postgres_uri, "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts),
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1",
           "MLFLOW_AUTH": "true", "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0],
           "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key"}
    log = (home / "server.log").open("w")
    server = subprocess.Popen(["sh", str(ROOT / "docker" / "mlflow-server.sh")], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while not healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url, artifacts
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def status_of(url: str, auth: tuple[str, str] | None = None) -> int:
    """HTTP status of an experiment search, with or without basic-auth credentials."""
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
    if auth:
        token = base64.b64encode(":".join(auth).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_requests_without_valid_credentials_are_refused(mlflow_server):
    url, _ = mlflow_server
    assert status_of(url) == 401
    assert status_of(url, (ADMIN[0], "wrong-password-123")) == 401
    assert status_of(url, ADMIN) == 200


def test_two_concurrent_trainings_are_logged_completely(mlflow_server, postgres_uri, tmp_path, monkeypatch,
                                                        random_image_folder):
    from mlflow.tracking import MlflowClient

    url, artifacts = mlflow_server
    data = random_image_folder(tmp_path / "images", 8)
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": ADMIN[0],
           "MLFLOW_TRACKING_PASSWORD": ADMIN[1], "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    flags = ["--config", "configs/demo.yaml", f"data.path={data}", "data.workers=0", "train.epochs=1",
             "train.warmup_epochs=0", "train.batch_size=4", f"train.steps_per_epoch={STEPS}",
             "log.every_steps=1", f"log.runs_root={tmp_path / 'runs'}", "log.experiment=compose-db-path"]
    launchers = {"via-entrypoint": [sys.executable, "docker/entrypoint.py"],
                 "direct": [sys.executable, "train.py"]}
    trainings = {name: subprocess.Popen([*launcher, *flags, f"log.run_name={name}"], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for name, launcher in launchers.items()}
    for name, training in trainings.items():
        output = training.communicate(timeout=400)[0]
        assert training.returncode == 0, f"{name}:\n{output[-3000:]}"
        assert "tracking:" not in output, f"{name} lost contact with the server:\n{output[-3000:]}"

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    client = MlflowClient(tracking_uri=url)
    experiment = client.get_experiment_by_name("compose-db-path")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(launchers)
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        assert run.data.params["train.steps_per_epoch"] == str(STEPS)
        assert run.data.params["data.path"] == os.path.relpath(data, tmp_path / "runs")  # runs-relative
        assert run.data.tags["world_size"] == "1"
        losses = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(metric.step for metric in losses) == list(range(1, STEPS + 1)), name
        assert all(np.isfinite(metric.value) for metric in losses)
        figures = {item.path for folder in ("figures", "reconstructions")
                   for item in client.list_artifacts(run.info.run_id, folder)}
        assert figures == {"figures/masks.png", "reconstructions/reconstruction-epoch-0001.png"}, name
        local = client.download_artifacts(run.info.run_id, "figures/masks.png", str(tmp_path / name))
        assert Image.open(local).size[0] > 0
    stored = {path.name for path in artifacts.rglob("*.png")}  # served from the server's volume
    assert {"masks.png", "reconstruction-epoch-0001.png"} <= stored
    assert run_count_in_postgres(postgres_uri, experiment.experiment_id) == 2


def run_count_in_postgres(uri: str, experiment_id: str) -> int:
    """Count the experiment's runs straight from the database: the server really uses PostgreSQL."""
    import psycopg2

    with psycopg2.connect(uri.replace("postgresql+psycopg2", "postgresql")) as connection, \
            connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(experiment_id),))
        return cursor.fetchone()[0]


def test_offline_run_syncs_into_the_auth_server_and_exports_its_encoder(mlflow_server, tmp_path, monkeypatch,
                                                                        random_image_folder):
    """A run trained while the server was down: a sync with a wrong password is one line (exit 2) and
    keeps the records; with the right one the run, its encoder included, is on the server, where
    `model.export --checkpoint runs:/ID` finds it (a server has no checkpoint to fall back to)."""
    import train

    url, _ = mlflow_server
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the dead server: one refused connection
    data, run_dir = random_image_folder(tmp_path / "images", 8), tmp_path / "runs" / "offline"
    train.main(["--config", str(ROOT / "configs" / "demo.yaml"), f"data.path={data}", "data.workers=0",
                "train.epochs=1", "train.warmup_epochs=0", "train.batch_size=4", "train.steps_per_epoch=2",
                "model.args={depth: 1, decoder_depth: 1}", f"log.runs_root={tmp_path / 'runs'}",
                "log.run_name=offline", f"--mlflow-uri=http://127.0.0.1:{free_port()}"])
    sync = [str(Path(sys.executable).parent / "colormae-tracking"), "sync", str(run_dir), "--mlflow-uri", url]
    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": "wrong-password"}
    refused = subprocess.run(sync, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith(f"error: MLflow at {url} refused the credentials (HTTP 401)")
    assert (run_dir / "mlflow-offline.jsonl").is_file()  # kept for the right password

    env["MLFLOW_TRACKING_PASSWORD"] = ADMIN[1]
    synced = subprocess.run(sync, env=env, capture_output=True, text=True, timeout=120)
    assert synced.returncode == 0, synced.stderr
    run_id = synced.stdout.split()[-1]
    export = [sys.executable, "-m", "model.export", "--checkpoint", f"runs:/{run_id}", "--mlflow-uri", url,
              "--out", str(tmp_path / "exported")]
    exported = subprocess.run(export, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr
    card = json.loads((tmp_path / "exported" / "model-card.json").read_text())
    assert (card["pretraining_run_id"], card["steps"]) == (run_id, 2)
