"""What a run logs, as records: plain JSON dicts that `apply` writes to an MLflow client.

The live `Tracker` applies each record as it comes; while the store is down it appends them to a
JSON-lines file instead, and `sync` replays that file through the same two functions (`open_run`
for each "start" record, `apply` for the rest). A new kind of logged item is one record kind here.

    {"op": "start", "uri", "experiment", "run_name", "tags": {name: str}, "run_id": str | None}
    {"op": "params", "params": {name: str}}
    {"op": "metrics", "metrics": {name: float}, "step": int, "timestamp": ms}
    {"op": "tags", "tags": {name: str}}
    {"op": "artifact", "path": file, "artifact_path": folder | None, "table": bool (optional)}
    {"op": "dataset", "name", "source", "digest", "num_images": int, "context"}
    {"op": "model", "path": folder, "name", "step": int, "tags": {name: str}, "register_as": str | None,
     "params": {name: str}, "description": str, "model_type": str}    (the last three optional)
    {"op": "end", "status": "FINISHED" | "FAILED" | "KILLED"}
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tracking.store import artifact_location, artifact_repository

log = logging.getLogger("tracking")
OFFLINE_FILE = "mlflow-offline.jsonl"
FILE_OPS = ("artifact", "model")  # records whose "path" names a file or folder to upload
# An experiment of model training: MLflow 3's UI shows it as a runs table, not a GenAI agent's traces.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"  # which artifacts are tables (MlflowClient.log_table's)


def open_run(client, uri: str, experiment: str, *, run_name: str | None, tags: dict[str, str],
             run_id: str | None = None) -> tuple[str, str]:
    """Continue run `run_id` (RUNNING again, `tags` added) or create one in `experiment` (made if
    missing) -> (run id, experiment id)."""
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        apply(client, run_id, {"op": "tags", "tags": tags})
        return run_id, client.get_run(run_id).info.experiment_id
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=artifact_location(uri, experiment), tags=EXPERIMENT_TAGS)
    return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id, experiment_id


def apply(client, run_id: str, record: dict, root: Path = Path()) -> str | None:
    """Write one record to run `run_id`; a relative "path" is read under `root`. Returns the id of the
    logged model of a "model" record (None for the others)."""
    from mlflow.entities import Metric, Param, RunTag

    op = record["op"]
    if op == "params":  # MLflow params are immutable: values already in the run are kept
        old = client.get_run(run_id).data.params
        changed = sorted(k for k, v in record["params"].items() if k in old and old[k] != v)
        if changed:
            log.warning("tracking: params differ from the original run, kept the old values: %s",
                        ", ".join(changed))
        new = [Param(k, v) for k, v in record["params"].items() if k not in old]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=new[i : i + 100])
    elif op == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, record["timestamp"], record["step"])
                                          for k, v in record["metrics"].items()])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
    elif op == "artifact":
        run = client.get_run(run_id)
        artifact_repository(client.tracking_uri, run.info.artifact_uri).log_artifact(
            str(root / record["path"]), record["artifact_path"])
        if record.get("table"):  # a JSON table in pandas' split layout: the UI shows it as a table
            path = "/".join(filter(None, (record["artifact_path"], Path(record["path"]).name)))
            table = {"path": path, "type": "table"}
            tables = json.loads(run.data.tags.get(LOGGED_ARTIFACTS_TAG, "[]"))
            if table not in tables:
                client.set_tag(run_id, LOGGED_ARTIFACTS_TAG, json.dumps([*tables, table]))
    elif op == "dataset":
        client.log_inputs(run_id, datasets=[_dataset_input(record)])
    elif op == "model":
        return _log_model(client, run_id, record, root)
    elif op == "end":
        client.set_terminated(run_id, status=record["status"])
    else:
        raise ValueError(f"unknown tracking record {op!r}")
    return None


def _dataset_input(record: dict):
    """An MLflow DatasetInput for a folder of images: its path, image count and manifest hash."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=record["name"], digest=record["digest"], source_type="local",
                      source=json.dumps({"uri": record["source"]}),
                      profile=json.dumps({"num_images": record["num_images"]}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", record["context"])])


def _log_model(client, run_id: str, record: dict, root: Path) -> str:
    """The folder, an MLflow model, as a logged model of the run (the Logged models field) with its
    params and description; its MLmodel file names the logged model and the run. Registered if asked."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    experiment_id = client.get_run(run_id).info.experiment_id
    description = {"mlflow.note.content": record["description"]} if record.get("description") else {}
    tags = {**record["tags"], **description}
    model = client.create_logged_model(experiment_id, name=record["name"], source_run_id=run_id, tags=tags,
                                       params=record.get("params"), model_type=record.get("model_type"))
    folder = root / record["path"]
    if (folder / "MLmodel").is_file():
        mlmodel = Model.load(str(folder / "MLmodel"))
        mlmodel.model_id = mlmodel.model_uuid = model.model_id
        mlmodel.run_id, mlmodel.artifact_path = run_id, model.artifact_location
        mlmodel.save(str(folder / "MLmodel"))
    artifact_repository(client.tracking_uri, model.artifact_location).log_artifacts(str(folder))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, record["step"])])
    if record["register_as"]:
        _register(client, run_id, record["register_as"], model)
    return model.model_id


def _register(client, run_id: str, name: str, model) -> None:
    """A new version of registered model `name` for a logged model; a failure only warns."""
    from mlflow.exceptions import MlflowException

    try:
        try:
            client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # The artifact location, not models:/ID: the store would resolve that against the
        # process-wide tracking URI instead of this client's.
        version = client.create_model_version(name, model.artifact_location, run_id=run_id,
                                              model_id=model.model_id)
        log.info("tracking: registered model %s version %s", name, version.version)
    except Exception as err:
        log.warning("tracking: could not register model %s: %s", name, err)
