"""What the evaluations and `model.export` read: a pretrained encoder, wherever it is.

    read_pretrained("runs/demo/checkpoint-last.pth")  # a train.py checkpoint
    read_pretrained("exported/demo")                  # a model.export folder, or a downloaded MLflow model
    read_pretrained("models:/colormae-encoder/1")     # a registered version (models:/NAME@ALIAS, models:/ID)
    read_pretrained("runs:/<run id>")                 # a run's last logged encoder, else its last checkpoint

Each gives a checkpoint dict: `model` (a state dict under MAE names; an export holds the encoder
only), `model_args`, what is known of the training (`config`, `epoch`, `step`, `mlflow_run_id`,
`final_loss`, `fingerprint`) and `path`, the source as given. mlflow loads only for URIs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from model.checkpoint import CheckpointError, check_preset_size, read_checkpoint, read_encoder

URI_SCHEMES = ("models:/", "runs:/")


def read_pretrained(source: str | Path, expect_preset: str | None = None,
                    tracking_uri: str | None = None) -> dict:
    """The checkpoint dict of `source` (see the module's docstring); a CheckpointError naming it when it
    cannot be read. expect_preset: the encoder must be that preset's size (checked, not rebuilt).
    tracking_uri: the store of models:/ and runs:/ URIs (default: MLFLOW_TRACKING_URI, else runs/mlflow.db).
    """
    text = str(source)
    if text.startswith(URI_SCHEMES):
        import tracking

        checkpoint = _read_uri(text, tracking.resolve_uri(tracking_uri, "runs"))
    elif Path(text).is_dir():
        checkpoint = read_folder(Path(text))
    else:
        checkpoint = read_checkpoint(text)  # a missing or unreadable file: a CheckpointError naming it
        if "model_args" not in checkpoint:
            raise CheckpointError(f"{text} is not a train.py checkpoint (needs 'model' and 'model_args')")
    if expect_preset is not None:
        check_preset_size(checkpoint["model_args"], expect_preset)
    return {**checkpoint, "path": text}


def read_folder(folder: Path) -> dict:
    """An export folder (config.json, model.safetensors, model-card.json), or an MLflow model around one
    (its MLmodel names the run that logged it: the run of a card written offline, before a sync)."""
    run_id = None
    if (folder / "MLmodel").is_file():  # model.export.save_mlflow_model: the export is its `encoder` artifact
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
        run_id = mlmodel.get("run_id")
        folder = folder / mlmodel["flavors"]["python_function"]["artifacts"]["encoder"]["path"]
    state, card = read_encoder(folder)
    return {"model": state, "model_args": card["model_args"], "config": card.get("config"),
            "epoch": card.get("epochs", 0), "step": card.get("steps", 0),
            "mlflow_run_id": card.get("pretraining_run_id") or run_id, "final_loss": card.get("final_loss"),
            "fingerprint": card.get("fingerprint")}


def _read_uri(uri: str, tracking_uri: str) -> dict:
    """A models:/ or runs:/ URI of the store at `tracking_uri`: its encoder, downloaded and read."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    import tracking

    client = MlflowClient(tracking_uri)
    try:
        location = model_location(client, uri)
        if location is None:  # a run that logged no encoder (stopped early): its last checkpoint
            return _run_checkpoint(client, uri, tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            return read_folder(tracking.download_artifacts(tracking_uri, location, tmp))
    except MlflowException as err:
        raise CheckpointError(f"{uri} in {tracking_uri}: {err.message.splitlines()[0]}") from None


def model_location(client, uri: str) -> str | None:
    """The artifact location of the logged model `uri` names: models:/NAME/VERSION, models:/NAME@ALIAS,
    models:/MODEL_ID, runs:/RUN_ID (its last logged model) or runs:/RUN_ID/NAME; None for a run
    without one."""
    if uri.startswith("models:/"):
        name = uri.removeprefix("models:/").strip("/")
        if "@" in name:
            version = client.get_model_version_by_alias(*name.split("@", 1))
        elif "/" in name:
            version = client.get_model_version(*name.split("/", 1))
        else:
            return client.get_logged_model(name).artifact_location
        if version.source.startswith("models:/"):  # registered by a logged model's id
            return client.get_logged_model(version.source.removeprefix("models:/")).artifact_location
        return version.source  # registered by the logged model's artifact location (tracking.records)
    run_id, _, name = uri.removeprefix("runs:/").strip("/").partition("/")
    run = client.get_run(run_id)
    models = [m for m in client.search_logged_models([run.info.experiment_id],
                                                     filter_string=f"source_run_id = '{run_id}'")
              if not name or m.name == name]
    return max(models, key=lambda m: m.creation_timestamp).artifact_location if models else None


def _run_checkpoint(client, uri: str, tracking_uri: str) -> dict:
    """The checkpoint a run recorded (tag `checkpoint`, relative to its runs root: the store's folder)."""
    import tracking

    run = client.get_run(uri.removeprefix("runs:/").strip("/").partition("/")[0])
    checkpoint = run.data.tags.get("checkpoint")
    database = tracking.sqlite_file(tracking_uri)
    if not checkpoint or database is None:
        raise CheckpointError(f"{uri} logged no encoder and its checkpoint is not found from {tracking_uri}")
    found = read_checkpoint(database.parent / checkpoint)
    return {**found, "final_loss": run.data.metrics.get("loss"),
            "fingerprint": run.data.tags.get("colormae.fingerprint")}
