"""MLflow tracking that never stops training.

`Tracker` wraps an `MlflowClient` for one run. The default store is a SQLite file next to the run
folders (no server needed); `uri` may name a tracking server instead. When the store cannot be
reached, at the start or in the middle of a run, the tracker warns once, keeps every later call
as JSON lines in `offline_dir` (artifacts copied there too) and says how to replay them:

    colormae-tracking sync runs/demo --mlflow-uri http://127.0.0.1:5000   # or: python tracking.py sync ...

A SQLite store keeps its artifacts in mlartifacts/ beside mlflow.db. MLflow records them by
absolute path, so whenever this module opens such a store it first re-anchors the paths at the
database's own folder (`relocate`): runs/ can be moved or copied. To browse one:

    colormae-tracking ui runs           # relocate, then `mlflow ui` on runs/mlflow.db

mlflow itself is imported only when a tracker is enabled (`log.mlflow=false` never loads it).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# Short HTTP retries: a dead server must cost seconds, not minutes (users may override).
for _name, _value in (
    ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
    ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
    ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
):
    os.environ.setdefault(_name, _value)

log = logging.getLogger("tracking")
OFFLINE_FILE = "mlflow-offline.jsonl"
RUN_ID_FILE = "mlflow-run-id"  # written by sync when it created the run: a resumed run continues it
ARTIFACTS_DIR = "mlartifacts"
# Columns of an MLflow SQLite store that hold artifact locations (re-anchored by `relocate`).
_ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                     ("model_versions", "source"))


@dataclass
class LogConfig:
    """The `log:` section of a training config: where runs go and what MLflow records."""

    runs_root: str = "runs"  # run folders, and the default MLflow store (mlflow.db, mlartifacts/)
    run_name: str | None = None  # run folder name; default: the config file's name
    experiment: str = "colormae"
    mlflow: bool = True
    mlflow_uri: str | None = None  # tracking server; default MLFLOW_TRACKING_URI, else SQLite in runs_root
    every_steps: int = 20  # metrics every N optimiser steps (and at every epoch end)
    recon_every: int = 1  # reconstruction grid every N epochs (0 = never)
    weights_every: int = 0  # log the encoder to MLflow every N epochs too (0 = at the end only)
    register_model: str | None = None  # also register the final encoder under this model name
    system_metrics: bool = True  # MLflow's CPU / memory / GPU metrics of the run

    def check(self) -> list[str]:
        """Problems, one line each naming its key: an unwritable runs root, negative intervals."""
        problems = []
        unwritable = writable_problem(self.runs_root)
        if unwritable:
            problems.append(f"log.runs_root '{self.runs_root}': {unwritable}")
        if self.every_steps < 1 or self.recon_every < 0 or self.weights_every < 0:
            problems.append("log.every_steps must be >= 1, log.recon_every and log.weights_every >= 0")
        return problems


def writable_problem(folder: str | Path) -> str | None:
    """Why files cannot be created under `folder` (or the nearest existing folder above it), if so."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            return None
    except OSError as err:
        return f"{existing} is not writable ({err.strerror or err})"

def default_tracking_uri(runs_root: str | Path) -> str:
    """The embedded store: a SQLite database in the runs root."""
    return f"sqlite:///{Path(runs_root).resolve()}/mlflow.db"


def resolve_uri(uri: str | None, runs_root: str | Path) -> str:
    """`uri`, else MLFLOW_TRACKING_URI, else the embedded SQLite store in `runs_root`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(runs_root)


def ui_command(uri: str) -> str:
    """How to look at the runs: `tracking.py ui` for a local SQLite store, the address for a server."""
    if uri.startswith("http"):
        return f"open {uri} in a browser"
    if uri.startswith("sqlite:///"):
        import cli  # here: cli imports configs, which imports this module

        return cli.command("colormae-tracking", "ui", str(Path(uri.removeprefix("sqlite:///")).parent))
    return f"mlflow ui --backend-store-uri {uri}"


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go to mlartifacts/ beside the database; a server decides its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS_DIR).resolve().as_uri()
    return None


def relocate(uri: str) -> int:
    """Point a moved or copied SQLite store's artifact locations at its own mlartifacts/ folder.

    Locations written for another mlartifacts/ folder (the store's old place) get this folder's
    prefix; anything else (a server's store, other artifact roots) is left alone. Returns the
    number of experiments re-anchored.
    """
    root = _artifact_location(uri)
    database = Path(uri.removeprefix("sqlite:///"))
    if root is None or not database.is_file():
        return 0
    with sqlite3.connect(database) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return 0
        old_roots = {loc for (loc,) in db.execute("SELECT artifact_location FROM experiments")
                     if loc.startswith("file://") and loc.endswith("/" + ARTIFACTS_DIR) and loc != root}
        for old in old_roots:
            for table, column in _ARTIFACT_COLUMNS:
                if table in tables:
                    db.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                               f"WHERE substr({column}, 1, ?) = ?", (root, len(old) + 1, len(old), old))
    if old_roots:
        log.info("tracking: %s moved; its artifact locations now point at %s", database, root)
    return len(old_roots)


def open_client(uri: str):
    """An MlflowClient for `uri`; a SQLite store is re-anchored first (see `relocate`)."""
    from mlflow import MlflowClient

    relocate(uri)
    return MlflowClient(tracking_uri=uri)


def standard_tags(source_name: str, git_commit: str | None = None) -> dict[str, str]:
    """MLflow's own source, user and commit tags, which fill the run page's Source and Created by."""
    tags = {"mlflow.source.name": source_name, "mlflow.source.type": "LOCAL",
            "mlflow.user": os.environ.get("USER") or getpass.getuser()}
    if git_commit and git_commit != "unknown":
        tags["mlflow.source.git.commit"] = git_commit
    return tags


def environment() -> dict[str, Any]:
    """Python, CUDA/driver/GPUs and the versions of the loader libraries, for the run's artifacts."""
    import torch

    from pipelines.backends import optional_packages

    packages = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()}
    libraries = (*(dist.split("-cuda")[0] for dist in optional_packages().values()), "cupy")
    loaders = {name: version for name, version in packages.items() if name.startswith(libraries)}
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    driver = nvidia_smi("driver_version").get("driver_version") if gpus else None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "gpus": gpus,
            "driver": driver, "loader_libraries": loaders,
            "pip_freeze": sorted(f"{name}=={version}" for name, version in packages.items())}


def nvidia_smi(*fields: str) -> dict[str, str]:
    """The first GPU's `fields` (e.g. "name", "driver_version") as nvidia-smi reports them; empty when
    there is no GPU, no nvidia-smi or no usable answer."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    values = [value.strip() for value in out.stdout.partition("\n")[0].split(",")]
    usable = out.returncode == 0 and len(values) == len(fields) and all(values)
    return dict(zip(fields, values, strict=True)) if usable else {}


def _is_rejected(err: Exception) -> bool:
    """The store answered and refused this request (e.g. a changed param); it is not down."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.error_code == "INVALID_PARAMETER_VALUE"


class Tracker:
    """One MLflow run that falls back to local JSON lines when the store is unreachable."""

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        *,
        run_name: str | None = None,
        tags: dict | None = None,
        run_id: str | None = None,
        enabled: bool = True,
        offline_dir: str | Path | None = None,
        system_metrics: bool = False,
    ) -> None:
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri("runs")
        self.enabled = enabled
        self.offline_dir = Path(offline_dir or "runs/mlflow-offline")
        self.offline = False
        self.run_id = run_id
        self.experiment_id: str | None = None
        self._client = None
        self._monitor = None  # MLflow's system metrics thread (CPU, memory, disk, network, GPU)
        if not enabled:
            return
        from mlflow.entities import RunTag

        self._start = {"op": "start", "uri": self.uri, "experiment": experiment, "run_name": run_name,
                       "tags": {k: str(v) for k, v in (tags or {}).items()}}
        try:
            self._client = open_client(self.uri)
            if run_id is None:
                exp = self._client.get_experiment_by_name(experiment)
                self.experiment_id = exp.experiment_id if exp else self._client.create_experiment(
                    experiment, artifact_location=_artifact_location(self.uri))
                run = self._client.create_run(self.experiment_id, run_name=run_name, tags=self._start["tags"])
                self.run_id = run.info.run_id
            else:
                self._client.update_run(run_id, status="RUNNING")
                self._client.log_batch(run_id, tags=[RunTag(k, v) for k, v in self._start["tags"].items()])
                self.experiment_id = self._client.get_run(run_id).info.experiment_id
            if system_metrics:
                self._start_system_metrics(resumed=run_id is not None)
        except Exception as err:  # any failure of the store: keep training
            self._go_offline(err)

    # -- public API ---------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Log params; on a resumed run, params already there are kept (MLflow params are immutable)."""
        params = {k: str(v) for k, v in params.items()}
        if self._online():
            from mlflow.entities import Param

            try:
                old = self._client.get_run(self.run_id).data.params
                changed = sorted(k for k in params if k in old and old[k] != params[k])
                if changed:
                    log.warning("tracking: params differ from the original run, kept the old values: %s",
                                ", ".join(changed))
                new = [Param(k, v) for k, v in params.items() if k not in old]
                for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
                    self._client.log_batch(self.run_id, params=new[i : i + 100])
                return
            except Exception as err:
                self._fail(err)
        self._write({"op": "params", "params": params})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log numeric metrics at an optimiser step."""
        timestamp = int(time.time() * 1000)
        metrics = {k: float(v) for k, v in metrics.items()}
        if self._online():
            from mlflow.entities import Metric

            try:
                batch = [Metric(k, v, timestamp, step) for k, v in metrics.items()]
                self._client.log_batch(self.run_id, metrics=batch)
                return
            except Exception as err:
                self._fail(err)
        self._write({"op": "metrics", "metrics": metrics, "step": step, "timestamp": timestamp})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file; offline, a copy is kept in offline_dir for the sync."""
        if self._online():
            try:
                self._client.log_artifact(self.run_id, str(path), artifact_path)
                return
            except Exception as err:
                self._fail(err)
        if self.enabled:
            keep = self.offline_dir / "offline-artifacts" / str(time.time_ns()) / Path(path).name
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, keep)
            self._write({"op": "artifact", "path": str(keep.relative_to(self.offline_dir)),
                         "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        """Save `text` as the run artifact `artifact_file` (e.g. "config.yaml", "environment/pip.txt")."""
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(text)
            self.log_artifact(path, str(Path(artifact_file).parent) if "/" in artifact_file else None)

    def log_dataset(self, name: str, source: str, digest: str, num_images: int,
                    context: str = "train") -> None:
        """Record a dataset input (the run page's Datasets field): where, how many images, which hash."""
        record = {"name": name, "source": source, "digest": digest, "num_images": num_images,
                  "context": context}
        if self._online():
            try:
                self._client.log_inputs(self.run_id, datasets=[_dataset_input(**record)])
                return
            except Exception as err:
                self._fail(err)
        self._write({"op": "dataset", **record})

    def log_model_folder(self, folder: str | Path, name: str, *, step: int, tags: dict | None = None,
                         register_as: str | None = None) -> str | None:
        """Log `folder` as an MLflow logged model of this run (the Logged models field); returns its id.

        register_as: also create a version of that registered model. Offline the files are kept as
        run artifacts under `name/` instead (the sync uploads them as such).
        """
        if self._online():
            from mlflow.entities import LoggedModelOutput, LoggedModelStatus

            try:
                model = self._client.create_logged_model(
                    self.experiment_id, name=name, source_run_id=self.run_id,
                    tags={k: str(v) for k, v in (tags or {}).items()})
                self._client.log_model_artifacts(model.model_id, str(folder))
                self._client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
                self._client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step)])
            except Exception as err:
                self._fail(err)
            else:
                if register_as:
                    self._register(register_as, model)
                return model.model_id
        for path in sorted(Path(folder).iterdir()):
            self.log_artifact(path, name)
        return None

    def close(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED); offline, print how to sync. Never raises (it runs
        in `finally` blocks, where an error would hide the one that ended the run)."""
        try:
            if self._monitor is not None:
                self._monitor.finish()
                self._monitor = None
            if self._online():
                try:
                    self._client.set_terminated(self.run_id, status=status)
                except Exception as err:
                    self._fail(err)
            if self.offline:
                self._write({"op": "end", "status": status})
                log.warning("tracking: metrics were kept offline in %s; sync them with:\n  %s",
                            self.offline_dir / OFFLINE_FILE, self.sync_command())
        except OSError as err:
            log.warning("tracking: could not record the end of the run (%s) in %s", err, self.offline_dir)

    def sync_command(self) -> str:
        """The command that replays the offline records into the tracking store."""
        import cli  # here: cli imports configs, which imports this module

        return cli.command("colormae-tracking", "sync", str(Path(self.offline_dir).resolve()), "--mlflow-uri",
                           self.uri)

    # -- internals ----------------------------------------------------------------------------
    def _start_system_metrics(self, resumed: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=self.uri)
        self._monitor.start()

    def _register(self, name: str, model) -> None:
        """A new version of registered model `name` for a logged model; a failure only warns."""
        from mlflow.exceptions import MlflowException

        try:
            try:
                self._client.create_registered_model(name)
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            # The artifact location, not models:/ID: the store would resolve that against the
            # process-wide tracking URI instead of this client's.
            version = self._client.create_model_version(name, model.artifact_location, run_id=self.run_id,
                                                        model_id=model.model_id)
            log.info("tracking: registered model %s version %s", name, version.version)
        except Exception as err:
            log.warning("tracking: could not register model %s: %s", name, err)

    def _online(self) -> bool:
        return self.enabled and not self.offline and self._client is not None and self.run_id is not None

    def _fail(self, err: Exception) -> None:
        if _is_rejected(err):
            log.warning("tracking: MLflow refused a request: %s", err)
            return
        self._go_offline(err)

    def _go_offline(self, err: Exception) -> None:
        self.offline = True
        log.warning("tracking: MLflow at %s is unreachable (%s); training goes on, metrics are kept in %s "
                    "(sync later with: %s)", self.uri, (str(err).splitlines() or [repr(err)])[0][:200],
                    self.offline_dir / OFFLINE_FILE, self.sync_command())
        self._write({**self._start, "run_id": self.run_id})  # a known run id: the sync continues that run

    def _write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.offline_dir.mkdir(parents=True, exist_ok=True)
        with open(self.offline_dir / OFFLINE_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")


def _dataset_input(name: str, source: str, digest: str, num_images: int, context: str):
    """An MLflow DatasetInput for a folder of images: its path, image count and manifest hash."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}),
                      profile=json.dumps({"num_images": num_images}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


def sync(offline_dir: str | Path, uri: str | None = None) -> list[str]:
    """Replay the offline records of `offline_dir` into `uri` (default: the URI they were meant for).

    Returns the run ids written to. The file is renamed afterwards so a second sync adds nothing.
    """
    offline_dir = Path(offline_dir)
    path = offline_dir / OFFLINE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no offline MLflow records in {offline_dir} (expected {OFFLINE_FILE})")
    from mlflow.entities import Metric, Param, RunTag

    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    client = None
    run_id: str | None = None
    run_ids: list[str] = []
    created = False
    for rec in records:
        op = rec["op"]
        if op == "start":
            client = open_client(uri or rec["uri"])
            if rec.get("run_id"):
                run_id = rec["run_id"]
            elif run_id is None:  # the store was down from the start: create the run now
                name = rec.get("experiment") or "colormae"
                exp = client.get_experiment_by_name(name)
                exp_id = exp.experiment_id if exp else client.create_experiment(
                    name, artifact_location=_artifact_location(uri or rec["uri"]))
                run_id = client.create_run(exp_id, run_name=rec.get("run_name")).info.run_id
                created = True
            client.update_run(run_id, status="RUNNING")
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in rec.get("tags", {}).items()])
            if run_id not in run_ids:
                run_ids.append(run_id)
        elif op == "params":
            old = client.get_run(run_id).data.params
            new = [Param(k, v) for k, v in rec["params"].items() if k not in old]
            for i in range(0, len(new), 100):
                client.log_batch(run_id, params=new[i : i + 100])
        elif op == "metrics":
            metrics = [Metric(k, v, rec["timestamp"], rec["step"]) for k, v in rec["metrics"].items()]
            client.log_batch(run_id, metrics=metrics)
        elif op == "artifact":
            client.log_artifact(run_id, str(offline_dir / rec["path"]), rec.get("artifact_path"))
        elif op == "dataset":
            fields = {k: v for k, v in rec.items() if k != "op"}
            client.log_inputs(run_id, datasets=[_dataset_input(**fields)])
        elif op == "end":
            client.set_terminated(run_id, status=rec["status"])
    path.rename(path.with_name(f"mlflow-offline.synced-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
    if created:
        (offline_dir / RUN_ID_FILE).write_text(f"{run_id}\n")
    return run_ids


def main(argv: list[str] | None = None) -> None:
    """`sync` offline records into a store; `ui`: relocate a runs folder's store and serve it."""
    parser = argparse.ArgumentParser(prog="colormae-tracking", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_sync = sub.add_parser("sync", help="replay offline MLflow records into a tracking store")
    p_sync.add_argument("offline_dir", help="the run folder holding " + OFFLINE_FILE)
    p_sync.add_argument("--mlflow-uri", default=None,
                        help="tracking URI (default: the one the run used)")
    p_ui = sub.add_parser("ui", help="`mlflow ui` on a runs folder's SQLite store (after relocating it)")
    p_ui.add_argument("runs_root", help="the folder holding mlflow.db and mlartifacts/")
    p_ui.add_argument("--port", type=int, default=5000, help="port to serve on (default: 5000)")
    args = parser.parse_args(argv)
    if args.command == "sync":
        for run_id in sync(args.offline_dir, args.mlflow_uri):
            print(f"synced {args.offline_dir} into run {run_id}")
        return
    uri = default_tracking_uri(args.runs_root)
    if not Path(args.runs_root, "mlflow.db").is_file():
        raise SystemExit(f"error: {args.runs_root} holds no mlflow.db")
    relocate(uri)
    os.execvp(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--port", str(args.port)])


if __name__ == "__main__":
    main()
