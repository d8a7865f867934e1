"""The encoder as MLflow and timm users load it, and the run page of a 3-step training run, read from a
runs folder that was moved after training, through plain MLflow (client, `mlflow ui`) and a browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import train
from eval import knn
from model import load_encoder
from pipelines import scan
from tracking.store import ML_VIEW, mlflow_ui_args, ui_url

ROOT = Path(__file__).resolve().parent.parent
MODEL = "colormae-encoder"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def moved(tmp_path_factory, random_image_folder) -> tuple[Path, Path]:
    """(runs root, data root): a 3-step run on <tmp>/fashion-mnist/train registered as MODEL, whose runs
    folder was then moved elsewhere (the original path no longer exists)."""
    work = tmp_path_factory.mktemp("work")
    data = work / "fashion-mnist"
    random_image_folder(data / "train", 12)
    random_image_folder(data / "val", 6)
    train.main(["--config", str(ROOT / "configs" / "demo.yaml"), f"data.path={data / 'train'}",
                f"log.runs_root={work / 'runs'}", "model.args={depth: 1, decoder_depth: 1}", "data.workers=0",
                "train.batch_size=8", "train.epochs=1", "train.steps_per_epoch=3", "log.every_steps=1",
                f"log.register_model={MODEL}", "log.system_metrics=false"])
    runs = work / "moved" / "runs"
    shutil.move(work / "runs", runs)
    return runs, data


@pytest.fixture(scope="module")
def server(moved):
    """Plain `mlflow ui` on the moved folder (what `colormae-tracking ui` runs): its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", *mlflow_ui_args(moved[0], port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "mlflow ui did not start"
            time.sleep(1)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def store(runs: Path) -> tuple[MlflowClient, object]:
    client = MlflowClient(f"sqlite:///{runs}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("colormae-demo").experiment_id],
                               "attributes.run_name = 'demo'")  # the pretraining run
    return client, run


def test_run_page_names_what_it_ran_on_without_local_paths(moved):
    runs, data = moved
    client, run = store(runs)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the runs table view
    assert experiment.artifact_location == "mlflow-artifacts:/colormae-demo"  # no path: the folder may move
    params, tags = run.data.params, run.data.tags
    resolved = (params["log.run_name"], params["resolved.precision"], params["resolved.device"])
    assert resolved == ("demo", "fp32", "cpu")  # the config's defaults and `auto`, as they resolved
    assert params["data.path"] == "../fashion-mnist/train" and "log.runs_root" not in params  # runs-relative
    assert not [v for v in (*params.values(), *tags.values()) if str(data.parent) in v or v.startswith("/")]
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.name == "fashion-mnist/train"
    assert dataset.dataset.digest == scan(data / "train").signature()
    assert json.loads(dataset.dataset.source) == {"uri": "../fashion-mnist/train"}

    assert not [key for key in run.data.metrics if "mask" in key]  # statistics: a table and params
    assert {"path": "mask_stats.json", "type": "table"} in json.loads(tags["mlflow.loggedArtifacts"])
    # what `mlflow ui --artifacts-destination <runs>/mlartifacts` serves for mlflow-artifacts:/colormae-demo
    table = json.loads((runs / "mlartifacts" / "colormae-demo" / run.info.run_id / "artifacts"
                        / "mask_stats.json").read_text())
    [row] = table["data"]
    assert row[0] == "green" and params[f"mask_stats.green.{table['columns'][1]}"] == str(round(row[1], 4))

    [model] = client.search_logged_models([run.info.experiment_id])
    assert client.get_model_version(MODEL, "1").source == model.artifact_location  # registered
    assert model.source_run_id == run.info.run_id and model.params["preset"] == "demo"
    assert model.params["architecture"] == "vit_w192_d1_patch4_32"
    assert float(model.params["final_loss"]) == client.get_metric_history(run.info.run_id, "loss")[-1].value
    assert model.tags["mlflow.note.content"].startswith("ColorMAE encoder vit_w192_d1_patch4_32")


def test_moved_store_serves_the_model_to_plain_mlflow_in_a_fresh_interpreter(moved, server, tmp_path):
    runs, _ = moved
    _, run = store(runs)
    client = MlflowClient(server)  # plain MLflow against plain `mlflow ui`: nothing rewritten
    assert {"config.yaml", "mask_stats.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    images = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    code = ("import mlflow, numpy as np\n"
            f"model = mlflow.pyfunc.load_model('models:/{MODEL}/1')\n"
            "np.save('features.npy', model.predict(np.load('images.npy')))\n"
            "print(model.metadata.metadata['mean'], model.metadata.get_input_schema().inputs[0].shape)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"MLFLOW_TRACKING_URI": server}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # another folder, no project code on the path
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[0.485, 0.456, 0.406] (-1, 3, 32, 32)" in done.stdout
    encoder = load_encoder(runs / "demo" / "checkpoint-last.pth").eval()
    with torch.no_grad():
        expected = encoder(torch.from_numpy(images)).numpy()
    assert np.allclose(np.load(tmp_path / "features.npy"), expected, atol=1e-5)


def test_evaluation_reads_a_registered_model_uri(moved):
    runs, data = moved
    uri = f"sqlite:///{runs}/mlflow.db"
    metrics = knn.main(["--checkpoint", f"models:/{MODEL}/1", "--mlflow-uri", uri, "--data", str(data),
                        "--device", "cpu", "--workers", "0", "--offline-dir", str(runs / "offline")])
    assert 0 <= metrics["knn_top1"] <= 1
    client, pretrain = store(runs)
    [evaluation] = client.search_runs([pretrain.info.experiment_id], "tags.evaluation = 'knn'")
    assert evaluation.data.tags["mlflow.parentRunId"] == pretrain.info.run_id  # the card names its run
    assert evaluation.data.tags["checkpoint"] == f"models:/{MODEL}/1"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (scripts/setup.sh)")
def test_printed_address_opens_the_runs_table_in_a_browser(moved, server, tmp_path):
    runs, _ = moved
    _, run = store(runs)
    port = int(server.rsplit(":", 1)[1])
    pages = {"experiment": ui_url(f"sqlite:///{runs}/mlflow.db", run.info.experiment_id, port),
             "run": f"{server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?{ML_VIEW}"}
    for name, url in pages.items():
        for budget in BROWSER_BUDGETS_MS:  # a loaded machine may still show the page's skeleton
            browse(url, budget, f"--screenshot={tmp_path / name}.png")
            if (tmp_path / f"{name}.png").stat().st_size > 20_000:  # a drawn page, not a skeleton
                break
        assert (tmp_path / f"{name}.png").stat().st_size > 20_000, name
    for budget in BROWSER_BUDGETS_MS:
        dom = browse(pages["experiment"], budget, "--dump-dom")
        if ">demo<" in dom:
            break
    assert "Run Name" in dom and ">demo<" in dom  # the runs table, with this run


BROWSER_BUDGETS_MS = (15_000, 60_000)


def browse(url: str, budget_ms: int, *args: str) -> str:
    """Headless Chromium on `url` after `budget_ms` of the page's (virtual) time: its stdout."""
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
               f"--virtual-time-budget={budget_ms}", *args, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=600).stdout
