"""Compare mask colours / schedules across MLflow runs: mean +/- std over seeds, with a noise verdict.

    python -m eval.compare --experiment colormae --mlflow-uri sqlite:///runs/mlflow.db --out runs/compare

One sample is one pretraining run: its own metrics plus those of every evaluation run tagged with
its id (`pretrain_run_id`). Samples are grouped by the pretraining `mask` parameter (a colour or a
schedule string). Each group is compared with a baseline group (default `random`, else the best
group) by Welch's t-test (unequal variances); a difference with p >= 0.05 is reported as within
seed noise. The table (Markdown + CSV) and one bar chart per metric are logged as artifacts of a
`compare` run in the same experiment.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib
import pandas as pd
from scipy import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ALPHA = 0.05


def fetch_runs(experiment: str, uri: str) -> pd.DataFrame:
    """All runs of an experiment, one row each: ``run_id`` and params.*, metrics.*, tags.* columns.

    Reads through its own client, so the process-wide tracking URI (and MLFLOW_TRACKING_URI,
    which ``mlflow.set_tracking_uri`` would overwrite) stay as they are.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"no MLflow experiment {experiment!r} at {uri}; experiments there: {names}")
    rows, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], max_results=1000, page_token=token)
        rows += [{"run_id": run.info.run_id,
                  **{f"params.{key}": value for key, value in run.data.params.items()},
                  **{f"metrics.{key}": value for key, value in run.data.metrics.items()},
                  **{f"tags.{key}": value for key, value in run.data.tags.items()}} for run in page]
        token = page.token
        if not token:
            break
    if not rows:
        raise ValueError(f"MLflow experiment {experiment!r} at {uri} has no runs")
    return pd.DataFrame(rows)


def samples_from_runs(runs: pd.DataFrame, by: str = "mask") -> pd.DataFrame:
    """One row per pretraining run: `group`, `run_id` and the last value of every metric.

    Evaluation runs (tag `pretrain_run_id`) contribute their metrics to their pretraining run's row;
    the group comes from the pretraining run's `by` parameter, else from the evaluation's `by` tag.
    """
    def column(name: str) -> pd.Series:
        return runs[name] if name in runs else pd.Series([None] * len(runs), index=runs.index)

    runs = runs[column("tags.evaluation") != "compare"]
    linked = column("tags.pretrain_run_id").fillna("")
    is_pretrain = linked == ""
    metric_columns = [c for c in runs.columns if c.startswith("metrics.")]
    frame = runs[metric_columns].rename(columns=lambda c: c.removeprefix("metrics."))
    frame.insert(0, "run_id", linked.where(~is_pretrain, runs["run_id"]))
    # the pretraining run's own parameter wins over the tag an evaluation copied
    group = column(f"params.{by}").fillna(column(f"tags.{by}")).replace("", None)
    ordered = pd.concat([group[is_pretrain].dropna(), group[~is_pretrain].dropna()])
    frame.insert(0, "group", frame["run_id"].map(ordered.groupby(frame["run_id"]).first()))
    frame = frame.dropna(subset=["group"])
    if frame.empty:
        raise ValueError(f"no runs with a {by!r} parameter or tag to group by")
    return frame.groupby(["group", "run_id"], as_index=False).first()


def summarise(samples: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Long table: group, metric, mean, std (sample std, ddof=1), n."""
    rows = []
    for group, part in samples.groupby("group", sort=False):
        for metric in metrics:
            values = part[metric].dropna() if metric in part else pd.Series(dtype=float)
            if len(values):
                rows.append({"group": group, "metric": metric, "mean": values.mean(),
                             "std": values.std(ddof=1) if len(values) > 1 else math.nan, "n": len(values)})
    return pd.DataFrame(rows, columns=["group", "metric", "mean", "std", "n"])


def noise_verdicts(samples: pd.DataFrame, metrics: list[str], baseline: str | None = "random") -> list[str]:
    """One sentence per (metric, group): difference to the baseline and whether it is within seed noise."""
    lines = []
    for metric in metrics:
        groups = {g: part[metric].dropna() for g, part in samples.groupby("group") if metric in part}
        groups = {g: v for g, v in groups.items() if len(v)}
        if len(groups) < 2:
            continue
        reference = baseline if baseline in groups else max(groups, key=lambda g: groups[g].mean())
        for group, values in groups.items():
            if group == reference:
                continue
            difference = values.mean() - groups[reference].mean()
            text = f"- {metric}: {group} - {reference} = {difference:+.4f}; "
            if len(values) < 2 or len(groups[reference]) < 2:
                lines.append(text + "cannot tell (needs >= 2 runs per group for Welch's t-test)")
                continue
            p_value = stats.ttest_ind(values, groups[reference], equal_var=False).pvalue
            if math.isnan(p_value):  # both groups without spread
                p_value = 1.0 if difference == 0 else 0.0
            verdict = "within seed noise" if p_value >= ALPHA else "beyond seed noise"
            lines.append(text + f"Welch t-test p = {p_value:.3f} -> {verdict} (alpha {ALPHA})")
    return lines


def markdown_table(summary: pd.DataFrame) -> str:
    """Groups as rows, metrics as columns (both in order of appearance), cells `mean ± std (n)`."""
    metrics = list(dict.fromkeys(summary["metric"]))
    lines = ["| group | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for group in dict.fromkeys(summary["group"]):
        part = summary[summary["group"] == group]
        cells = []
        for metric in metrics:
            row = part[part["metric"] == metric]
            if row.empty:
                cells.append("")
                continue
            mean, std, n = row.iloc[0][["mean", "std", "n"]]
            spread = "n/a" if math.isnan(std) else f"{std:.4f}"
            cells.append(f"{mean:.4f} ± {spread} ({int(n)})")
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(summary: pd.DataFrame, metric: str, path: Path) -> None:
    """Bar per group with a +/- 1 std error bar."""
    part = summary[summary["metric"] == metric]
    figure, axes = plt.subplots(figsize=(max(4, 1.2 * len(part)), 3.5))
    colours = [group if matplotlib.colors.is_color_like(group) else "tab:gray" for group in part["group"]]
    axes.bar(part["group"], part["mean"], yerr=part["std"].fillna(0), capsize=4, color=colours,
             edgecolor="black")
    for x, (mean, n) in enumerate(zip(part["mean"], part["n"], strict=True)):
        axes.annotate(f"n={n}", (x, mean), ha="center", va="bottom", fontsize=8)
    axes.set_ylabel(metric)
    axes.set_title(f"{metric}: mean ± std over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(samples: pd.DataFrame, metrics: list[str], out: Path, baseline: str | None = "random",
                 title: str = "Comparison") -> list[Path]:
    """comparison.md, comparison.csv and <metric>.png under `out`; returns the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(samples, metrics)
    csv_path, md_path = out / "comparison.csv", out / "comparison.md"
    summary.to_csv(csv_path, index=False)
    verdicts = noise_verdicts(samples, metrics, baseline)
    md_path.write_text(
        f"# {title}\n\nmean ± sample std (number of runs)\n\n{markdown_table(summary)}\n\n"
        "## Within seed noise?\n\n" + ("\n".join(verdicts) or "- nothing to compare") + "\n"
    )
    charts = []
    for metric in dict.fromkeys(summary["metric"]):
        charts.append(out / f"{metric.replace('/', '_')}.png")
        bar_chart(summary, metric, charts[-1])
    return [md_path, csv_path, *charts]


def main(argv: list[str] | None = None) -> list[Path]:
    """Command line: read an experiment, write and log the comparison."""
    from tracking import Tracker, resolve_uri

    parser = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment to compare (required)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    parser.add_argument("--out", default="runs/compare", help="report folder (default: %(default)s)")
    parser.add_argument("--by", default="mask",
                        help="pretraining parameter to group by (mask = colour or schedule)")
    parser.add_argument("--metrics", nargs="*", default=None,
                        help="default: every metric of the evaluation runs")
    parser.add_argument("--baseline", default="random", help="group the others are tested against")
    args = parser.parse_args(argv)

    uri = resolve_uri(args.mlflow_uri, "runs")
    runs = fetch_runs(args.experiment, uri)
    samples = samples_from_runs(runs, args.by).sort_values("group")
    evaluated = runs[runs.get("tags.pretrain_run_id", pd.Series(dtype=str)).fillna("") != ""]
    metrics = args.metrics or sorted({c.removeprefix("metrics.") for c in evaluated.columns
                                      if c.startswith("metrics.") and evaluated[c].notna().any()})
    available = [c for c in samples.columns if c not in ("group", "run_id")]
    metrics = metrics or available
    unknown = sorted(set(metrics) - set(available))
    if unknown:
        raise ValueError(f"metrics {unknown} are not in experiment {args.experiment!r}; "
                         f"available: {available}")
    paths = write_report(samples, metrics, Path(args.out), args.baseline, f"{args.experiment}: by {args.by}")
    tracker = Tracker(uri, args.experiment, run_name="compare", tags={"evaluation": "compare"})
    for path in paths:
        tracker.log_artifact(path, artifact_path="comparison")
    tracker.close()
    print(Path(paths[0]).read_text())
    return paths


if __name__ == "__main__":
    from errors import run_cli

    run_cli(main)  # an expected failure is one line; --debug shows the traceback
