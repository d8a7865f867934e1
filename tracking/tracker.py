"""`Tracker`: one MLflow run that keeps its records offline while the store cannot be reached."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tracking.records import FILE_OPS, OFFLINE_FILE, apply, open_run
from tracking.store import default_tracking_uri, failure, open_client, store_error

log = logging.getLogger("tracking")


class Tracker:
    """One MLflow run; each `log_*` call is a record (tracking.records) applied to the store, or kept
    in `offline_dir` once the store is down. Credentials the server refuses at the start raise
    CredentialsRefused (the user's input); a store that is down never stops training."""

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
        self._start = {"op": "start", "uri": self.uri, "experiment": experiment, "run_name": run_name,
                       "tags": {k: str(v) for k, v in (tags or {}).items()}}
        try:
            self._client = open_client(self.uri)
            self.run_id, self.experiment_id = open_run(self._client, self.uri, experiment, run_name=run_name,
                                                       tags=self._start["tags"], run_id=run_id)
            if system_metrics:
                self._start_system_metrics(resumed=run_id is not None)
        except Exception as err:
            if failure(err) is None:  # a bug, not the store
                raise
            if failure(err) == "refused":  # the user's input: stop before any step
                raise store_error(err, self.uri) from err
            self._go_offline(err)

    # -- public API ---------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Log params; on a resumed run, params already there are kept (MLflow params are immutable)."""
        self._log({"op": "params", "params": {k: str(v) for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log numeric metrics at an optimiser step."""
        self._log({"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": int(step),
                   "timestamp": int(time.time() * 1000)})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file; offline, a copy is kept in offline_dir for the sync."""
        self._log({"op": "artifact", "path": str(path), "artifact_path": artifact_path})

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
        self._log({"op": "dataset", "name": name, "source": str(source), "digest": digest,
                   "num_images": int(num_images), "context": context})

    def log_table(self, columns: list[str], rows: list[list], artifact_file: str) -> None:
        """Save a table as the JSON artifact `artifact_file` (pandas' split layout, as
        MlflowClient.log_table writes it): the run page shows it as a table."""
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(json.dumps({"columns": columns, "data": rows}) + "\n")
            parent = str(Path(artifact_file).parent) if "/" in artifact_file else None
            self._log({"op": "artifact", "path": str(path), "artifact_path": parent, "table": True})

    def log_model_folder(self, folder: str | Path, name: str, *, step: int, tags: dict | None = None,
                         register_as: str | None = None, params: dict | None = None,
                         description: str | None = None, model_type: str | None = None) -> str | None:
        """Log `folder` (an MLflow model) as a logged model of this run (the Logged models field), with
        `params` and a `description` on its page; returns its id (None offline: the sync logs the
        kept copy). register_as: also create a version of that registered model."""
        return self._log({"op": "model", "path": str(folder), "name": name, "step": int(step),
                          "tags": {k: str(v) for k, v in (tags or {}).items()}, "register_as": register_as,
                          "params": {k: str(v) for k, v in (params or {}).items()},
                          "description": description, "model_type": model_type})

    def close(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED); offline, print how to sync. Never raises (it runs
        in `finally` blocks, where an error would hide the one that ended the run)."""
        try:
            if self._monitor is not None:
                self._monitor.finish()
                self._monitor = None
            self._log({"op": "end", "status": status})
            if self.offline:
                log.warning("tracking: metrics were kept offline in %s; sync them with:\n  %s",
                            self.offline_dir / OFFLINE_FILE, self.sync_command())
        except Exception as err:
            log.warning("tracking: could not record the end of the run (%s) in %s", err, self.offline_dir)

    def sync_command(self) -> str:
        """The command that replays the offline records into the tracking store."""
        import cli  # here: cli imports configs, which imports this package

        return cli.command("colormae-tracking", "sync", str(Path(self.offline_dir).resolve()), "--mlflow-uri",
                           self.uri)

    # -- internals ----------------------------------------------------------------------------
    def _log(self, record: dict) -> str | None:
        """Apply `record` to the run; offline (or when the store goes down now) keep it instead."""
        if not self.enabled:
            return None
        if not self.offline:
            try:
                return apply(self._client, self.run_id, record)
            except Exception as err:
                kind = failure(err)
                if kind is None:
                    raise  # a bug, not the store: the caller's `finally` ends the run as FAILED
                if kind == "rejected":
                    log.warning("tracking: MLflow refused a request: %s", err)
                    return None
                self._go_offline(err)
        self._keep(record)
        return None

    def _start_system_metrics(self, resumed: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed, tracking_uri=self.uri)
        self._monitor.start()

    def _go_offline(self, err: Exception) -> None:
        self.offline = True
        why = "refused the credentials" if failure(err) == "refused" else "is unreachable"
        log.warning("tracking: MLflow at %s %s (%s); training goes on, metrics are kept in %s "
                    "(sync later with: %s)", self.uri, why, (str(err).splitlines() or [repr(err)])[0][:200],
                    self.offline_dir / OFFLINE_FILE, self.sync_command())
        self._keep({**self._start, "run_id": self.run_id})  # a known run id: the sync continues that run

    def _keep(self, record: dict) -> None:
        """Append `record` to the offline file; a file or folder it names is copied beside it first."""
        self.offline_dir.mkdir(parents=True, exist_ok=True)
        if record["op"] in FILE_OPS:
            source = Path(record["path"])
            keep = self.offline_dir / "offline-artifacts" / str(time.time_ns()) / source.name
            keep.parent.mkdir(parents=True)
            (shutil.copytree if source.is_dir() else shutil.copyfile)(source, keep)
            record = {**record, "path": str(keep.relative_to(self.offline_dir))}
        with open(self.offline_dir / OFFLINE_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
