"""MLflow tracking that never stops training.

`Tracker` wraps an `MlflowClient` for one run. The default store is a SQLite file next to the run
folders (no server needed); `uri` may name a tracking server instead. When the store cannot be
reached, at the start or in the middle of a run, the tracker warns once, keeps every later call
as JSON lines in `offline_dir` (artifacts copied there too) and says how to replay them:

    python tracking.py sync runs/demo --uri http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

# Short HTTP retries: a dead server must cost seconds, not minutes (users may override).
for _name, _value in (
    ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
    ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
    ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
):
    os.environ.setdefault(_name, _value)

from mlflow import MlflowClient  # noqa: E402  (after the environment defaults above)
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

log = logging.getLogger("tracking")
OFFLINE_FILE = "mlflow-offline.jsonl"
RUN_ID_FILE = "mlflow-run-id"  # written by sync when it created the run: a resumed run continues it


def default_tracking_uri(runs_root: str | Path) -> str:
    """The embedded store: a SQLite database in the runs root."""
    return f"sqlite:///{Path(runs_root).resolve()}/mlflow.db"


def resolve_uri(uri: str | None, runs_root: str | Path) -> str:
    """`uri`, else MLFLOW_TRACKING_URI, else the embedded SQLite store in `runs_root`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(runs_root)


def ui_command(uri: str) -> str:
    """How to look at the runs: `mlflow ui` for a local store, the address for a server."""
    if uri.startswith("http"):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go to mlartifacts/ beside the database; a server decides its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def _is_rejected(err: Exception) -> bool:
    """The store answered and refused this request (e.g. a changed param); it is not down."""
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
    ) -> None:
        self.uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri("runs")
        self.enabled = enabled
        self.offline_dir = Path(offline_dir or "runs/mlflow-offline")
        self.offline = False
        self.run_id = run_id
        self._client: MlflowClient | None = None
        if not enabled:
            return
        self._start = {"op": "start", "uri": self.uri, "experiment": experiment, "run_name": run_name,
                       "tags": {k: str(v) for k, v in (tags or {}).items()}}
        try:
            self._client = MlflowClient(tracking_uri=self.uri)
            if run_id is None:
                exp = self._client.get_experiment_by_name(experiment)
                exp_id = exp.experiment_id if exp else self._client.create_experiment(
                    experiment, artifact_location=_artifact_location(self.uri))
                run = self._client.create_run(exp_id, run_name=run_name, tags=self._start["tags"])
                self.run_id = run.info.run_id
            else:
                self._client.update_run(run_id, status="RUNNING")
                self._client.log_batch(run_id, tags=[RunTag(k, v) for k, v in self._start["tags"].items()])
        except Exception as err:  # any failure of the store: keep training
            self._go_offline(err)

    # -- public API ---------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Log params; on a resumed run, params already there are kept (MLflow params are immutable)."""
        params = {k: str(v) for k, v in params.items()}
        if self._online():
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
            try:
                batch = [Metric(k, v, timestamp, step) for k, v in metrics.items()]
                self._client.log_batch(self.run_id, metrics=batch)
                return
            except Exception as err:
                self._fail(err)
        self._write({"op": "metrics", "metrics": metrics, "step": step, "timestamp": timestamp})

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags."""
        tags = {k: str(v) for k, v in tags.items()}
        if self._online():
            try:
                self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
                return
            except Exception as err:
                self._fail(err)
        self._write({"op": "tags", "tags": tags})

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

    def close(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED); offline, print how to sync. Never raises (it runs
        in `finally` blocks, where an error would hide the one that ended the run)."""
        try:
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
        return f"python tracking.py sync {self.offline_dir} --uri {self.uri}"

    # -- internals ----------------------------------------------------------------------------
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


def sync(offline_dir: str | Path, uri: str | None = None) -> list[str]:
    """Replay the offline records of `offline_dir` into `uri` (default: the URI they were meant for).

    Returns the run ids written to. The file is renamed afterwards so a second sync adds nothing.
    """
    offline_dir = Path(offline_dir)
    path = offline_dir / OFFLINE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no offline MLflow records in {offline_dir} (expected {OFFLINE_FILE})")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    client: MlflowClient | None = None
    run_id: str | None = None
    run_ids: list[str] = []
    created = False
    for rec in records:
        op = rec["op"]
        if op == "start":
            client = MlflowClient(tracking_uri=uri or rec["uri"])
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
        elif op == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])
        elif op == "artifact":
            client.log_artifact(run_id, str(offline_dir / rec["path"]), rec.get("artifact_path"))
        elif op == "end":
            client.set_terminated(run_id, status=rec["status"])
    path.rename(path.with_name(f"mlflow-offline.synced-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
    if created:
        (offline_dir / RUN_ID_FILE).write_text(f"{run_id}\n")
    return run_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_sync = sub.add_parser("sync", help="replay offline MLflow records into a tracking store")
    p_sync.add_argument("offline_dir", help="the run folder holding " + OFFLINE_FILE)
    p_sync.add_argument("--uri", default=None, help="tracking URI (default: the one the run used)")
    args = parser.parse_args()
    for run_id in sync(args.offline_dir, args.uri):
        print(f"synced {args.offline_dir} into run {run_id}")


if __name__ == "__main__":
    main()
