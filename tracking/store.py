"""Where runs are recorded: tracking URIs, the embedded SQLite store, and what a store's error means.

A SQLite store keeps its artifacts in mlartifacts/ beside mlflow.db. MLflow records them by
absolute path, so whenever a client opens such a store the paths are first re-anchored at the
database's own folder (`relocate`): runs/ can be moved or copied.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

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
# Columns of an MLflow SQLite store that hold artifact locations (re-anchored by `relocate`).
_ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                     ("model_versions", "source"))


class CredentialsRefused(UserError):
    """The tracking server answered and refused the user's credentials (HTTP 401 or 403)."""


def default_tracking_uri(runs_root: str | Path) -> str:
    """The embedded store: a SQLite database in the runs root."""
    return f"sqlite:///{Path(runs_root).resolve()}/mlflow.db"


def resolve_uri(uri: str | None, runs_root: str | Path) -> str:
    """`uri`, else MLFLOW_TRACKING_URI, else the embedded SQLite store in `runs_root`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(runs_root)


def ui_command(uri: str) -> str:
    """How to look at the runs: `colormae-tracking ui` for a local SQLite store, the address for a server."""
    if uri.startswith("http"):
        return f"open {uri} in a browser"
    if uri.startswith("sqlite:///"):
        import cli  # here: cli imports configs, which imports this package

        return cli.command("colormae-tracking", "ui", str(Path(uri.removeprefix("sqlite:///")).parent))
    return f"mlflow ui --backend-store-uri {uri}"


def artifact_location(uri: str) -> str | None:
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
    root = artifact_location(uri)
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
