"""eval.compare against real MLflow SQLite stores filled by the tests, and the run fingerprint."""

import math

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

import cli
from configs import load_config
from configs.fingerprint import fingerprint
from eval import compare
from eval.common import EVALUATION_TAG, SUMMARY_TAG

KNN = {"random": [0.70, 0.72, 0.71], "green": [0.74, 0.78], "red": [0.60, 0.61, 0.59]}


class Store:
    """An MLflow experiment written the way train.py and the eval commands write it."""

    def __init__(self, uri: str, experiment: str):
        self.client = MlflowClient(tracking_uri=uri)
        self.uri, self.experiment = uri, experiment
        self.experiment_id = self.client.create_experiment(experiment)

    def pretrain(self, mask: str, seed: int, fingerprint: str = "fp-a", epochs: int = 3) -> str:
        tags = {"mask": mask, "checkpoint": f"runs/{mask}{seed}/checkpoint-last.pth"}
        if fingerprint:
            tags["colormae.fingerprint"] = fingerprint
        run_id = self.client.create_run(self.experiment_id, run_name=f"{mask}-{seed}", tags=tags).info.run_id
        for key, value in {"mask.schedule": mask, "train.seed": seed, "train.epochs": epochs}.items():
            self.client.log_param(run_id, key, value)
        self.client.log_metric(run_id, "loss", 0.5, step=1)
        self.client.set_terminated(run_id)
        return run_id

    def evaluate(self, parent: str, metric: str, value: float, evaluation: str = "knn-k20") -> str:
        tags = {"mlflow.parentRunId": parent, "pretrain_run_id": parent, "evaluation": metric.split("_")[0],
                EVALUATION_TAG: evaluation, SUMMARY_TAG: f"probe {evaluation}"}
        run_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
        self.client.log_metric(run_id, metric, value, step=1)
        self.client.set_terminated(run_id)
        return run_id

    def compare(self, out, *extra: str) -> str:
        compare.main(["--experiment", self.experiment, "--mlflow-uri", self.uri, "--out", str(out), *extra])
        return (out / "comparison.md").read_text()


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One SQLite store for the module (its set-up takes seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def filled(uri) -> tuple[Store, dict[str, list[float]]]:
    """Per mask and seed a pretraining run with a k-NN and a segmentation evaluation; the mIoUs logged."""
    store, seg = Store(uri, "colours"), {}
    for mask, values in KNN.items():
        for seed, knn in enumerate(values):
            run_id = store.pretrain(mask, seed)
            store.evaluate(run_id, "knn_top1", knn)
            store.evaluate(run_id, "seg_miou", knn / 3, evaluation="seg-canvas")
            seg.setdefault(mask, []).append(knn / 3)
    return store, seg


def test_mean_std_per_mask_and_the_logged_report(tmp_path, filled):
    store, seg = filled
    report = store.compare(tmp_path)
    table = pd.read_csv(tmp_path / "comparison.csv")
    assert set(table["metric"]) == {"knn_top1", "seg_miou"}  # evaluation metrics only
    assert set(table["comparison"]) == {1, 2}  # one comparison per evaluation, never one table of both
    for metric, expected in (("knn_top1", KNN), ("seg_miou", seg)):
        for mask, values in expected.items():
            row = table[(table["group"] == mask) & (table["metric"] == metric)].iloc[0]
            assert row["mean"] == pytest.approx(np.mean(values))
            assert row["std"] == pytest.approx(np.std(values, ddof=1))
            assert row["n"] == len(values)
    assert "| green | 0.7600 ± 0.0283 (2) |" in report
    assert "knn_top1: red - random" in report and "beyond seed noise" in report
    assert "paired t-test" in report and "seeds 0, 1, 2 ran with both masks" in report  # red vs random

    client = store.client
    [compare_run] = client.search_runs([store.experiment_id], "tags.evaluation = 'compare'")
    tags = compare_run.data.tags
    assert tags["mlflow.source.name"] == "eval.compare" and tags["mlflow.user"]
    logged = {a.path for a in client.list_artifacts(compare_run.info.run_id, "comparison")}
    assert {"comparison/comparison.md", "comparison/1-knn_top1.png", "comparison/2-seg_miou.png"} <= logged
    store.compare(tmp_path / "again")  # an earlier compare run is not a sample
    assert pd.read_csv(tmp_path / "again" / "comparison.csv").equals(table)


def test_empty_experiment_says_so_without_a_traceback(tmp_path, uri, capsys):
    store = Store(uri, "empty")
    report = store.compare(tmp_path)
    assert "no runs yet" in report and "make train" in report and "no runs yet" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "comparison.csv").empty
    assert not store.client.search_runs([store.experiment_id])  # nothing to log, no compare run


def test_pretraining_runs_only_give_the_command_to_evaluate(tmp_path, uri):
    store = Store(uri, "pretrain-only")
    run_id = store.pretrain("green", 0)
    report = store.compare(tmp_path)
    assert "No evaluation runs yet (1 pretraining run(s))" in report
    assert f"{cli.command('colormae-knn')} --checkpoint runs:/{run_id} --data" in report  # eval.* read runs:/


def test_missing_experiment_and_unknown_metric_are_clear_errors(tmp_path, filled):
    store, _ = filled
    with pytest.raises(ValueError, match="no MLflow experiment 'missing'"):
        compare.main(["--experiment", "missing", "--mlflow-uri", store.uri, "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"metrics \['top5'\] are not in experiment 'colours'"):
        store.compare(tmp_path, "--metrics", "top5")
    missing = tmp_path / "absent.db"
    with pytest.raises(ValueError, match=f"no MLflow store at {missing}: train first"):
        compare.main(["--experiment", "colours", "--mlflow-uri", f"sqlite:///{missing}", "--out",
                      str(tmp_path / "out")])
    assert not missing.exists()  # no empty store left behind


def test_two_fingerprints_are_never_pooled(tmp_path, uri):
    store = Store(uri, "two-fingerprints")
    values = {("fp-long", 3): {"random": [0.80, 0.82], "green": [0.85, 0.88]},
              ("fp-short", 1): {"random": [0.30, 0.31], "green": [0.32]}}
    for (print_, epochs), groups in values.items():
        for mask, accuracies in groups.items():
            for seed, accuracy in enumerate(accuracies):
                store.evaluate(store.pretrain(mask, seed, print_, epochs), "knn_top1", accuracy)
    report = store.compare(tmp_path)
    table = pd.read_csv(tmp_path / "comparison.csv")
    for (print_, _), groups in values.items():
        for mask, accuracies in groups.items():
            [row] = table[(table["fingerprint"] == print_) & (table["group"] == mask)].itertuples()
            assert row.mean == pytest.approx(np.mean(accuracies)) and row.n == len(accuracies)
    assert "2 pretraining fingerprints" in report and "train.epochs: 1 vs 3" in report
    assert "green has one run (seed 0): no spread" in report


def test_runs_without_fingerprint_or_evaluation_record_are_left_out_and_counted(tmp_path, uri):
    store = Store(uri, "partial")
    old = store.pretrain("green", 0, fingerprint="")
    store.evaluate(old, "knn_top1", 0.5)
    store.evaluate(store.pretrain("random", 0), "knn_top1", 0.5, evaluation="")
    crashed = store.evaluate(store.pretrain("random", 1), "knn_top1", 0.5)
    store.client.set_terminated(crashed, "FAILED")
    report = store.compare(tmp_path)
    assert "1 evaluation run(s) left out: failed or not finished" in report
    assert "1 evaluated pretraining run(s) left out: no fingerprint recorded" in report
    assert "green-0" in report
    assert "1 evaluation run(s) left out: they do not record what they evaluated" in report


def samples(groups: dict[str, dict[int, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"group": group, "seed": seed, "run_id": f"{group}{seed}", "acc": value}
                         for group, values in groups.items() for seed, value in values.items()])


def test_paired_test_when_seeds_pair_welch_when_they_do_not():
    # the seed moves both masks alike; green is consistently ~0.01 better
    random, green = {0: 0.70, 1: 0.75, 2: 0.80}, {0: 0.712, 1: 0.759, 2: 0.811}
    [paired] = compare.noise_verdicts(samples({"random": random, "green": green}), ["acc"])
    assert "paired t-test" in paired and "seeds 0, 1, 2 ran with both masks" in paired
    assert "beyond seed noise" in paired
    assert "Welch's t-test, for reference: p = 0.8" in paired  # Welch's test alone would miss it
    shifted = {seed + 10: value for seed, value in green.items()}  # other seeds: nothing pairs
    [unpaired] = compare.noise_verdicts(samples({"random": random, "green": shifted}), ["acc"])
    assert "paired" not in unpaired and "since no seed ran with both masks" in unpaired
    assert "within seed noise" in unpaired
    exactly_one_image = {0: 0.70 + 1 / 128, 1: 0.75 + 1 / 128, 2: 0.80 + 1 / 128}  # no spread: no verdict
    [same] = compare.noise_verdicts(samples({"random": random, "green": exactly_one_image}), ["acc"])
    assert "+0.0078" in same and "cannot tell" in same and "noise" not in same
    [equal] = compare.noise_verdicts(samples({"random": random, "green": dict(random)}), ["acc"])
    assert "the same score on every seed (0, 1, 2): no difference" in equal
    one_common = {2: 0.811, 7: 0.76, 8: 0.70}
    [partly] = compare.noise_verdicts(samples({"random": random, "green": one_common}), ["acc"])
    assert "Welch's t-test" in partly and "since only seed 2 ran with both" in partly


def test_single_run_groups_have_no_std_and_no_verdict():
    one_each = samples({"random": {0: 0.7}, "green": {0: 0.8}})
    summary = compare.summarise(one_each, ["acc"])
    assert math.isnan(summary["std"].iloc[0]) and summary["n"].tolist() == [1, 1]
    assert "cannot tell" in compare.noise_verdicts(one_each, ["acc"])[0]


def test_fingerprint_ignores_seed_mask_and_logging_only():
    def digest(*overrides, signature="abc", steps=10):
        return fingerprint(load_config(None, list(overrides)), signature, steps_per_epoch=steps)[0]

    base = digest()
    same = ("train.seed=3", "mask.schedule=blue", "mask.ratio=0.5", "log.run_name=x", "log.experiment=y")
    assert all(digest(override) == base for override in same)
    different = [digest("train.epochs=3"), digest("data.path=elsewhere"), digest("model.preset=demo"),
                 digest("data.img_size=32"), digest("train.base_lr=1e-3"), digest(signature="abd"),
                 digest(steps=11)]
    assert base not in different and len(set(different)) == len(different)
    keys = fingerprint(load_config(None), "abc", steps_per_epoch=10)[1]
    assert keys["data.signature"] == "abc" and keys["steps_per_epoch"] == "10" and "train.seed" not in keys
