"""Replay the records a `Tracker` kept offline into a tracking store."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tracking.records import OFFLINE_FILE, apply, open_run
from tracking.store import failure, open_client, store_error

RUN_ID_FILE = "mlflow-run-id"  # written by sync when it created the run: a resumed run continues it


def sync(offline_dir: str | Path, uri: str | None = None) -> list[str]:
    """Replay the offline records of `offline_dir` into `uri` (default: the URI they were meant for).

    Returns the run ids written to. The file is renamed afterwards so a second sync adds nothing.
    A store that refuses the credentials raises CredentialsRefused, one that is down a RunFailure.
    """
    offline_dir = Path(offline_dir)
    path = offline_dir / OFFLINE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no offline MLflow records in {offline_dir} (expected {OFFLINE_FILE})")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    client, run_id, run_ids, created, target = None, None, [], False, uri
    try:
        for rec in records:
            if rec["op"] == "start":
                target = uri or rec["uri"]
                client = open_client(target)
                created |= rec["run_id"] is None and run_id is None  # the store was down from the start
                run_id, _ = open_run(client, target, rec["experiment"], run_name=rec["run_name"],
                                     tags=rec["tags"], run_id=rec["run_id"] or run_id)
                if run_id not in run_ids:
                    run_ids.append(run_id)
            else:
                apply(client, run_id, rec, root=offline_dir)
    except Exception as err:
        if failure(err) is None:  # a bug, not the store
            raise
        raise store_error(err, target) from err
    path.rename(path.with_name(f"mlflow-offline.synced-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
    if created:
        (offline_dir / RUN_ID_FILE).write_text(f"{run_id}\n")
    return run_ids
