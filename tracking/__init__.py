"""MLflow tracking that never stops training.

`Tracker` wraps an `MlflowClient` for one run. The default store is a SQLite file next to the run
folders (no server needed); `uri` may name a tracking server instead. Every logged item is a record
(tracking/records.py) that one function applies to a client. When the store cannot be reached, at
the start or in the middle of a run, the tracker warns once, keeps every later record as a JSON line
in `offline_dir` (files copied there too) and says how to replay them with the same function:

    colormae-tracking sync runs/demo --mlflow-uri http://127.0.0.1:5000   # or: python -m tracking sync ...

Credentials the server refuses (HTTP 401/403) are the user's input, not a dead server: the tracker
raises CredentialsRefused before any training step. A runs folder's SQLite store records its
artifacts under MLflow's served-artifacts scheme (no local path: runs/ may be moved or copied); to
browse it with plain `mlflow ui` (the command and the runs tables' addresses are printed first):

    colormae-tracking ui runs

Parts: config.py (the `log:` section), store.py (URIs, the SQLite store, what an error means),
provenance.py (source, user, commit, machine), records.py (record -> client), tracker.py, sync.py.
mlflow itself is imported only when a tracker is enabled (`log.mlflow=false` never loads it).
"""

from tracking.config import LogConfig
from tracking.provenance import environment, git_commit, nvidia_smi, standard_tags, user_name
from tracking.records import OFFLINE_FILE, apply, open_run
from tracking.store import (
    CredentialsRefused,
    default_tracking_uri,
    download_artifacts,
    open_client,
    resolve_uri,
    sqlite_file,
    ui_command,
    ui_url,
)
from tracking.sync import RUN_ID_FILE, sync
from tracking.tracker import Tracker

__all__ = ["OFFLINE_FILE", "RUN_ID_FILE", "CredentialsRefused", "LogConfig", "Tracker", "apply",
           "default_tracking_uri", "download_artifacts", "environment", "git_commit", "nvidia_smi",
           "open_client", "open_run", "resolve_uri", "sqlite_file", "standard_tags", "sync", "ui_command",
           "ui_url", "user_name"]
