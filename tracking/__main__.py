"""`colormae-tracking sync RUN_DIR` (or `python -m tracking sync ...`) replays offline records;
`colormae-tracking ui RUNS` serves a runs folder's store with plain `mlflow ui`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import errors
import tracking
from tracking import OFFLINE_FILE, default_tracking_uri, sync
from tracking.store import mlflow_ui_args, open_client, ui_url


def main(argv: list[str] | None = None) -> None:
    """`sync` offline records into a store; `ui`: print the runs tables' addresses, then run `mlflow ui`."""
    parser = argparse.ArgumentParser(prog="colormae-tracking", description=tracking.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_sync = sub.add_parser("sync", help="replay offline MLflow records into a tracking store")
    p_sync.add_argument("offline_dir", help="the run folder holding " + OFFLINE_FILE)
    p_sync.add_argument("--mlflow-uri", default=None,
                        help="tracking URI (default: the one the run used)")
    p_ui = sub.add_parser("ui", help="plain `mlflow ui` on a runs folder's SQLite store and its artifacts")
    p_ui.add_argument("runs_root", help="the folder holding mlflow.db and mlartifacts/")
    p_ui.add_argument("--port", type=int, default=5000, help="port to serve on (default: 5000)")
    args = parser.parse_args(argv)
    if args.command == "sync":
        for run_id in sync(args.offline_dir, args.mlflow_uri):
            print(f"synced {args.offline_dir} into run {run_id}")
        return
    uri = default_tracking_uri(args.runs_root)
    if not Path(args.runs_root, "mlflow.db").is_file():
        raise FileNotFoundError(f"{args.runs_root} holds no mlflow.db")
    for experiment in open_client(uri).search_experiments():
        print(f"{experiment.name}: {ui_url(uri, experiment.experiment_id, args.port)}")
    command = mlflow_ui_args(args.runs_root, args.port)
    print(" ".join(command), flush=True)
    os.execvp(sys.executable, [sys.executable, "-m", *command])


if __name__ == "__main__":
    errors.run_cli(main)
