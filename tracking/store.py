"""Where runs are recorded: tracking URIs, the embedded SQLite store, and what a store's error means.

A SQLite store keeps its artifacts in mlartifacts/ beside mlflow.db, under MLflow's served-artifacts
scheme: the store records `mlflow-artifacts:/<experiment>/...`, never a local path, so runs/ can be
moved or copied and plain `mlflow ui --backend-store-uri sqlite:///<runs>/mlflow.db
--artifacts-destination <runs>/mlartifacts` (what `ui_command` prints) serves it, as does
`mlflow server` to any MLflow client. This project's own code reads and writes that folder directly
(`artifact_repository`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from urllib.parse import urlparse

from errors import RunFailure, UserError

# Short HTTP retries: a dead server must cost seconds, not minutes (users may override).
for _name, _value in (
    ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
    ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
    ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
):
    os.environ.setdefault(_name, _value)

log = logging.getLogger("tracking")
ARTIFACTS_DIR = "mlartifacts"
ML_VIEW = "workflowType=machine_learning"  # the UI's runs table (MLflow 3 opens GenAI views otherwise)


class CredentialsRefused(UserError):
    """The tracking server answered and refused the user's credentials (HTTP 401 or 403)."""


def default_tracking_uri(runs_root: str | Path) -> str:
    """The embedded store: a SQLite database in the runs root."""
    return f"sqlite:///{Path(runs_root).resolve()}/mlflow.db"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local SQLite store (`sqlite:///PATH`); None for any other URI."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def resolve_uri(uri: str | None, runs_root: str | Path) -> str:
    """`uri`, else MLFLOW_TRACKING_URI, else the embedded SQLite store in `runs_root`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(runs_root)


def ui_command(uri: str) -> str:
    """How to look at the runs: `colormae-tracking ui` for a local SQLite store, the address for a server."""
    if uri.startswith("http"):
        return f"open {uri} in a browser"
    database = sqlite_file(uri)
    if database is not None:
        import cli  # here: cli imports configs, which imports this package

        return cli.command("colormae-tracking", "ui", str(database.parent))
    return f"mlflow ui --backend-store-uri {uri}"


def ui_url(uri: str, experiment_id: str | None = None, port: int = 5000) -> str:
    """The address of an experiment's runs table (or of the experiment list) in MLflow's UI, in its
    view for model training: on the server `uri` names, else on a local `mlflow ui` at `port`."""
    base = uri.rstrip("/") if uri.startswith("http") else f"http://127.0.0.1:{port}"
    return f"{base}/#/experiments{f'/{experiment_id}' if experiment_id else ''}?{ML_VIEW}"


def mlflow_ui_args(runs_root: str | Path, port: int = 5000) -> list[str]:
    """Plain `mlflow ui` on a runs folder's SQLite store and its served artifacts."""
    root = Path(runs_root).resolve()
    return ["mlflow", "ui", "--backend-store-uri", default_tracking_uri(root), "--artifacts-destination",
            str(root / ARTIFACTS_DIR), "--port", str(port)]


def artifact_location(uri: str, experiment: str) -> str | None:
    """A new experiment's artifact location: for a SQLite store MLflow's served-artifacts scheme,
    `mlflow-artifacts:/<experiment>`, which names no folder (see `artifact_repository`); a server
    decides its own (None)."""
    if uri.startswith("sqlite:///"):
        return f"mlflow-artifacts:/{re.sub(r'[^A-Za-z0-9._-]+', '_', experiment)}"
    return None


def artifacts_root(uri: str) -> Path:
    """Where a SQLite store's served artifacts live: mlartifacts/ beside mlflow.db."""
    return sqlite_file(uri).parent / ARTIFACTS_DIR


def artifact_repository(uri: str, artifact_uri: str):
    """MLflow's artifact repository for `artifact_uri` of the store at `uri`. A SQLite store's
    `mlflow-artifacts:/X` is the folder `mlartifacts/X` beside it, the folder `mlflow ui
    --artifacts-destination <runs>/mlartifacts` serves; other URIs go to MLflow's own repositories."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    if uri.startswith("sqlite:///") and artifact_uri.startswith("mlflow-artifacts:"):
        path = urlparse(artifact_uri).path.lstrip("/")
        return LocalArtifactRepository(str(artifacts_root(uri) / path))
    return get_artifact_repository(artifact_uri, tracking_uri=uri)


def download_artifacts(uri: str, artifact_uri: str, dst: str | Path) -> Path:
    """Download the artifacts under `artifact_uri` of the store at `uri` into `dst` (made if missing);
    returns the folder."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(artifact_repository(uri, artifact_uri).download_artifacts("", str(dst)))


def open_client(uri: str):
    """An MlflowClient for `uri`."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def failure(err: Exception) -> str | None:
    """What an error of a client call means: "refused" (the server refused the credentials),
    "rejected" (the store refused this one request, e.g. a changed param), "down" (the store cannot
    be reached or written); None: none of these, a bug."""
    import requests
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    if isinstance(err, MlflowException):
        if err.get_http_status_code() in (401, 403):
            return "refused"
        return "rejected" if err.error_code == "INVALID_PARAMETER_VALUE" else "down"
    return "down" if isinstance(err, OSError | requests.RequestException | SQLAlchemyError) else None


def store_error(err: Exception, uri: str) -> UserError | RunFailure:
    """A failed client call (one `failure` names) as one line: CredentialsRefused (the user's input,
    exit 2) or RunFailure (the store is down, exit 1)."""
    if failure(err) == "refused":
        code = err.get_http_status_code()
        return CredentialsRefused(f"MLflow at {uri} refused the credentials (HTTP {code}): check "
                                  "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    return RunFailure(f"MLflow at {uri} failed: {(str(err).splitlines() or [repr(err)])[0][:200]}")
