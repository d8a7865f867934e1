"""eval.compare against a real MLflow SQLite store filled by the test."""

import math

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from eval import compare

KNN = {"random": [0.70, 0.72, 0.71], "green": [0.74, 0.78], "red": [0.60, 0.61, 0.59]}


def log_runs(uri: str, experiment: str) -> dict[str, list[float]]:
    """Pretraining runs (tag mask) and one k-NN + one segmentation evaluation run per pretraining run."""
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(experiment)
    seg = {}
    for mask, values in KNN.items():
        seg[mask] = []
        for seed, knn in enumerate(values):
            pretrain = client.create_run(experiment_id, tags={"mask": mask}).info.run_id
            client.log_param(pretrain, "train.seed", seed)
            client.log_metric(pretrain, "loss", 1.0 - knn / 2, step=0)
            client.set_terminated(pretrain)
            evaluations = (("knn", "knn_top1", knn), ("segmentation", "seg_miou", knn / 3))
            for evaluation, metric, value in evaluations:
                tags = {"pretrain_run_id": pretrain, "evaluation": evaluation, "mask": mask}
                run = client.create_run(experiment_id, tags=tags).info.run_id
                client.log_metric(run, metric, value, step=1)
                client.set_terminated(run)
            seg[mask].append(knn / 3)
    return seg


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, dict[str, list[float]]]:
    """A SQLite MLflow store holding the runs of `log_runs`, and the segmentation values logged."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    return uri, log_runs(uri, "colours")


def test_compare_reproduces_mean_and_std_of_logged_runs(tmp_path, store):
    uri, seg = store
    paths = compare.main(["--experiment", "colours", "--mlflow-uri", uri, "--out", str(tmp_path / "out")])

    table = pd.read_csv(tmp_path / "out" / "comparison.csv")
    assert set(table["metric"]) == {"knn_top1", "seg_miou"}  # evaluation metrics only, by default
    for metric, expected in (("knn_top1", KNN), ("seg_miou", seg)):
        for mask, values in expected.items():
            row = table[(table["group"] == mask) & (table["metric"] == metric)].iloc[0]
            assert row["mean"] == pytest.approx(np.mean(values))
            assert row["std"] == pytest.approx(np.std(values, ddof=1))
            assert row["n"] == len(values)

    report = (tmp_path / "out" / "comparison.md").read_text()
    assert "| green |" in report and "0.7600 ± 0.0283 (2)" in report
    assert "knn_top1: red - random" in report and "beyond seed noise" in report
    assert "knn_top1: green - random" in report
    assert {p.name for p in paths} >= {"comparison.md", "comparison.csv", "knn_top1.png", "seg_miou.png"}

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_experiment_by_name("colours").experiment_id
    [compare_run] = client.search_runs([experiment_id], "tags.evaluation = 'compare'")
    logged = {a.path for a in client.list_artifacts(compare_run.info.run_id, "comparison")}
    assert "comparison/comparison.md" in logged and "comparison/knn_top1.png" in logged


def test_noise_verdicts_use_welch_t_test():
    samples = pd.DataFrame({"group": ["random"] * 3 + ["green"] * 3,
                            "run_id": list("abcdef"),
                            "acc": [0.70, 0.75, 0.80, 0.71, 0.76, 0.81]})
    [line] = compare.noise_verdicts(samples, ["acc"])
    assert "green - random = +0.0100" in line and "within seed noise" in line
    samples.loc[samples["group"] == "green", "acc"] += 1.0
    [line] = compare.noise_verdicts(samples, ["acc"])
    assert "beyond seed noise" in line


def test_single_run_groups_have_no_std_and_no_verdict():
    samples = pd.DataFrame({"group": ["random", "green"], "run_id": ["a", "b"], "acc": [0.7, 0.8]})
    summary = compare.summarise(samples, ["acc"])
    assert math.isnan(summary["std"].iloc[0]) and summary["n"].tolist() == [1, 1]
    assert "cannot tell" in compare.noise_verdicts(samples, ["acc"])[0]


def test_unknown_metric_is_a_clear_error(tmp_path, store):
    uri, _ = store
    with pytest.raises(ValueError, match=r"metrics \['top5'\] are not in experiment 'colours'"):
        compare.main(["--experiment", "colours", "--mlflow-uri", uri, "--out", str(tmp_path),
                      "--metrics", "top5"])


def test_unknown_experiment_is_a_clear_error(store):
    with pytest.raises(ValueError, match="no MLflow experiment 'missing'"):
        compare.fetch_runs("missing", store[0])
