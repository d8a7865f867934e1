"""tracking: the embedded SQLite store, resumed runs, a store that cannot be reached or refuses the
credentials, and offline records that replay to what the live tracker logs.

A real `mlflow server` that dies in the middle of a training run is tested in test_train.py.
"""

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

import cli
import tracking
from tracking.store import artifact_repository


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One SQLite store for the module (creating its tables takes seconds); tests use own experiments."""
    return tmp_path_factory.mktemp("runs")


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> list[str]:
    """A run's artifacts under `folder`, read where the store keeps them (its served-artifacts folder)."""
    repository = artifact_repository(client.tracking_uri, client.get_run(run_id).info.artifact_uri)
    return sorted(a.path for a in repository.list_artifacts(folder))


def test_sqlite_store_records_params_metrics_tags_and_artifacts(store, tmp_path):
    uri = tracking.default_tracking_uri(store)
    assert uri == f"sqlite:///{store.resolve()}/mlflow.db"
    tracker = tracking.Tracker(uri, "records", run_name="demo", tags={"loader": "torch"},
                               offline_dir=tmp_path / "demo")
    tracker.log_params({"train.epochs": 2, "mask.schedule": "green"})
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": 1.0 / step, "lr": 1e-3}, step)
    figure = tmp_path / "recon.png"
    figure.write_bytes(b"png")
    tracker.log_artifact(figure, "reconstructions")
    tracker.close()

    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "demo"
    assert run.data.params == {"train.epochs": "2", "mask.schedule": "green"}
    assert run.data.tags["loader"] == "torch"
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [
        (1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert artifact_paths(client, tracker.run_id, "reconstructions") == ["reconstructions/recon.png"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/records/")  # served: names no local folder
    served = store / "mlartifacts" / "records" / run.info.run_id / "artifacts"
    assert (served / "reconstructions" / "recon.png").is_file()
    assert not (tmp_path / "demo" / tracking.OFFLINE_FILE).exists()


def test_resumed_run_continues_and_keeps_original_params(store, tmp_path, caplog):
    uri = tracking.default_tracking_uri(store)
    first = tracking.Tracker(uri, "resumed", offline_dir=tmp_path)
    first.log_params({"train.epochs": 2})
    first.log_metrics({"loss": 1.0}, 1)
    first.close("KILLED")
    again = tracking.Tracker(uri, "resumed", run_id=first.run_id, tags={"resumed": 1}, offline_dir=tmp_path)
    assert again.run_id == first.run_id
    again.log_params({"train.epochs": 4, "lr": 0.1})  # a changed param is reported, not fatal
    again.log_metrics({"loss": 0.5}, 2)
    again.close()

    assert "params differ from the original run" in caplog.text and not again.offline
    run = MlflowClient(uri).get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.epochs": "2", "lr": "0.1"} and run.data.tags["resumed"] == "1"
    assert [m.step for m in MlflowClient(uri).get_metric_history(first.run_id, "loss")] == [1, 2]


def test_unreachable_server_keeps_everything_offline_then_syncs(store, tmp_path, caplog):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    tracker = tracking.Tracker(dead, "offline", run_name="offline", tags={"mask": "green"},
                               offline_dir=tmp_path)
    tracker.log_params({"train.epochs": 2})
    tracker.log_dataset("train", "/data/train", "0123abcd", 48)
    for step in range(1, 6):
        tracker.log_metrics({"loss": float(step)}, step)
    (tmp_path / "masks.png").write_bytes(b"png")
    tracker.log_artifact(tmp_path / "masks.png", "figures")
    tracker.close()
    assert time.monotonic() - start < 60, "a dead server must not stall training for minutes"
    assert tracker.offline and tracker.run_id is None
    assert caplog.text.count("is unreachable") == 1  # warned once, not per call
    hint = cli.command("colormae-tracking", "sync", str(tmp_path.resolve()), "--mlflow-uri", dead)
    assert hint in caplog.text
    records = [json.loads(line) for line in (tmp_path / tracking.OFFLINE_FILE).read_text().splitlines()]
    assert [r["op"] for r in records] == ["start", "params", "dataset", *["metrics"] * 5, "artifact", "end"]

    uri = tracking.default_tracking_uri(store)
    (run_id,) = tracking.sync(tmp_path, uri)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "offline"
    assert run.data.params == {"train.epochs": "2"} and run.data.tags["mask"] == "green"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5]
    assert artifact_paths(client, run_id, "figures") == ["figures/masks.png"]
    [dataset] = run.inputs.dataset_inputs
    assert (dataset.dataset.digest, json.loads(dataset.dataset.profile)) == ("0123abcd", {"num_images": 48})
    with pytest.raises(FileNotFoundError, match="no offline MLflow records"):
        tracking.sync(tmp_path, uri)  # the synced file was renamed: nothing is replayed twice


def test_disabled_tracker_writes_nothing(tmp_path):
    tracker = tracking.Tracker(None, "exp", enabled=False, offline_dir=tmp_path / "run")
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.close()
    assert tracker.run_id is None and not (tmp_path / "run").exists()


def test_uri_choice_and_ui_command(tmp_path, monkeypatch):
    uri = tracking.default_tracking_uri(tmp_path)
    assert tracking.ui_command(uri) == cli.command("colormae-tracking", "ui", str(tmp_path.resolve()))
    # the runs table in MLflow 3's view for model training (its default is the GenAI one)
    assert tracking.ui_url(uri, "3") == "http://127.0.0.1:5000/#/experiments/3?workflowType=machine_learning"
    assert tracking.ui_url("http://host:80/", "3").startswith("http://host:80/#/experiments/3?")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri(None, tmp_path) == uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-host:5000")
    assert tracking.resolve_uri(None, tmp_path) == "http://env-host:5000"
    assert tracking.resolve_uri("http://flag-host:5000", tmp_path) == "http://flag-host:5000"


def test_disabled_tracking_never_imports_mlflow(tmp_path):
    """log.mlflow=false must work where mlflow is not even installed (the GPU check's machines)."""
    code = ("import sys, tracking\n"
            f"t = tracking.Tracker(None, 'exp', enabled=False, offline_dir={str(tmp_path)!r})\n"
            "t.log_params({'a': 1}); t.log_metrics({'loss': 1.0}, 1); t.log_text('x', 'config.yaml')\n"
            "t.log_dataset('train', '/data', 'abc', 3); t.close()\n"
            "print('mlflow' in sys.modules)")
    root = Path(tracking.__file__).parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False" and not list(tmp_path.iterdir())


def test_moved_runs_folder_still_serves_artifacts_and_models(tmp_path):
    """Copy runs/ elsewhere, delete the original: the plain client reads the copy, and its artifacts are
    where `mlflow ui --artifacts-destination <copy>/mlartifacts` serves them (tests/test_mlflow_models.py
    reads them through that server); nothing in the store is rewritten."""
    original = tmp_path / "original"
    uri = tracking.default_tracking_uri(original)
    tracker = tracking.Tracker(uri, "moved", offline_dir=tmp_path / "run")
    tracker.log_text("train: {epochs: 2}\n", "config.yaml")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.bin").write_bytes(b"weights")
    tracker.log_model_folder(tmp_path / "weights", "encoder", step=1)
    tracker.close()
    copy = tmp_path / "elsewhere" / "runs"
    shutil.copytree(original, copy)
    shutil.rmtree(original)

    copy_uri = tracking.default_tracking_uri(copy)
    before = (copy / "mlflow.db").read_bytes()
    client = MlflowClient(copy_uri)  # plain MLflow
    run = client.get_run(tracker.run_id)
    assert run.info.artifact_uri == f"mlflow-artifacts:/moved/{tracker.run_id}/artifacts"
    served = copy / "mlartifacts" / "moved" / tracker.run_id / "artifacts"
    assert (served / "config.yaml").read_text() == "train: {epochs: 2}\n"
    [model] = client.search_logged_models([tracker.experiment_id])
    weights = tracking.download_artifacts(copy_uri, model.artifact_location, tmp_path / "dl") / "model.bin"
    assert weights.read_bytes() == b"weights"
    assert (copy / "mlflow.db").read_bytes() == before  # read, never rewritten


def test_system_metrics_are_logged_when_switched_on(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tracker = tracking.Tracker(tracking.default_tracking_uri(store), "system", offline_dir=tmp_path,
                               system_metrics=True)
    deadline = time.monotonic() + 60
    client = MlflowClient(tracking.default_tracking_uri(store))
    while not client.get_run(tracker.run_id).data.metrics and time.monotonic() < deadline:
        time.sleep(0.2)
    tracker.close()
    metrics = client.get_run(tracker.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)


def test_standard_tags_fill_source_user_and_commit():
    tags = tracking.standard_tags("/repo/train.py", "a" * 40)
    assert tags["mlflow.source.name"] == "/repo/train.py" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] and tags["mlflow.source.git.commit"] == "a" * 40
    assert "mlflow.source.git.commit" not in tracking.standard_tags("train.py", "unknown")


def log_everything(tracker: tracking.Tracker, files: Path) -> None:
    """One of each kind of record, with numpy numbers where the trainer has them (an ffcv image count)."""
    tracker.log_params({"train.epochs": 2, "lr": np.float32(0.5)})
    tracker.log_metrics({"loss": np.float32(0.25), "images_per_s": np.float64(8.0)}, np.int64(1))
    tracker.log_metrics({"loss": 0.125}, 2)
    tracker.log_text("train: {epochs: 2}\n", "config.yaml")
    tracker.log_text("numpy==2\n", "environment/pip-freeze.txt")
    tracker.log_dataset("train", "/data/train", "0123abcd", np.uint64(48))
    (files / "encoder").mkdir(parents=True, exist_ok=True)
    (files / "encoder" / "model.safetensors").write_bytes(b"weights")
    tracker.log_model_folder(files / "encoder", "encoder", step=2, tags={"epoch": 2})
    tracker.close()


def what_was_logged(uri: str, run_id: str) -> dict:
    """Everything a run page shows that the records write (run ids and times left out)."""
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    return {
        "status": run.info.status, "params": run.data.params,
        "tags": {k: v for k, v in run.data.tags.items() if k not in ("mlflow.runName",)},
        "metrics": {name: sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
                    for name in run.data.metrics},
        "artifacts": artifact_paths(client, run_id) + artifact_paths(client, run_id, "environment"),
        "datasets": [(d.dataset.name, d.dataset.digest, d.dataset.profile, d.dataset.source)
                     for d in run.inputs.dataset_inputs],
        "models": [(m.name, m.tags, [o.step for o in run.outputs.model_outputs],
                    sorted(a.path for a in artifact_repository(uri, m.artifact_location).list_artifacts(""))
                    ) for m in models],
    }


def test_offline_records_replay_to_exactly_what_the_live_tracker_logs(store, tmp_path, caplog):
    """The same calls, once to a live store and once to a dead server then synced, log the same run; the
    live one stays online (numpy numbers are values, not a dead store)."""
    uri = tracking.default_tracking_uri(store)
    live = tracking.Tracker(uri, "replay", run_name="replay", tags={"loader": "ffcv"},
                            offline_dir=tmp_path / "a")
    log_everything(live, tmp_path / "a-files")
    assert not live.offline and "unreachable" not in caplog.text

    dead = tracking.Tracker(f"http://127.0.0.1:{free_port()}", "replay", run_name="replay",
                            tags={"loader": "ffcv"}, offline_dir=tmp_path / "b")
    log_everything(dead, tmp_path / "b-files")
    shutil.rmtree(tmp_path / "b-files")  # the offline folder keeps its own copies
    (replayed,) = tracking.sync(tmp_path / "b", uri)
    assert what_was_logged(uri, replayed) == what_was_logged(uri, live.run_id)
    [model] = what_was_logged(uri, replayed)["models"]
    assert model == ("encoder", {"epoch": "2"}, [2], ["model.safetensors"])


def test_a_bug_in_a_logged_value_is_raised_not_taken_for_a_dead_store(store, tmp_path, caplog):
    tracker = tracking.Tracker(tracking.default_tracking_uri(store), "bug", offline_dir=tmp_path)
    with pytest.raises(TypeError):
        tracker.log_dataset("train", "/data", "abc", num_images=object())
    tracker.close("FAILED")
    assert not tracker.offline and "unreachable" not in caplog.text
    assert MlflowClient(tracking.default_tracking_uri(store)).get_run(tracker.run_id).info.status == "FAILED"


def test_refused_credentials_are_the_users_input_not_a_dead_server(refusing_server, tmp_path):
    with pytest.raises(tracking.CredentialsRefused, match=r"refused the credentials \(HTTP 40[13]\)"):
        tracking.Tracker(refusing_server, "auth", offline_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing kept offline: nothing was trained

    offline = tracking.Tracker(f"http://127.0.0.1:{free_port()}", "auth", offline_dir=tmp_path / "down")
    offline.log_metrics({"loss": 1.0}, 1)
    offline.close()
    done = subprocess.run([sys.executable, "-m", "tracking", "sync", str(tmp_path / "down"), "--mlflow-uri",
                           refusing_server], cwd=Path(tracking.__file__).parent.parent, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: MLflow at {refusing_server} refused the credentials")
    assert (tmp_path / "down" / tracking.OFFLINE_FILE).is_file()  # kept for a sync with the right password


def test_user_without_a_passwd_entry_is_named_by_uid(monkeypatch):
    """`docker run --user UID:GID` gives a uid that /etc/passwd does not know, and often no USER."""
    def unknown(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    for name in ("USER", "LOGNAME", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(pwd, "getpwuid", unknown)
    assert tracking.standard_tags("train.py", "unknown")["mlflow.user"] == str(os.getuid())
    monkeypatch.setenv("USER", "alice")
    assert tracking.standard_tags("train.py", "unknown")["mlflow.user"] == "alice"
