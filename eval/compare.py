"""Compare mask colours / schedules across MLflow runs, pooling only like with like.

    python -m eval.compare --experiment colormae-demo --out runs/compare

A comparison holds the evaluation runs that share two things: the fingerprint of their pretraining
run (tag `colormae.fingerprint`: config, data and steps per epoch, everything but seed and mask) and
the evaluation itself (tag `colormae.evaluation`: probe, its parameters, checkpoint epoch, data).
Anything else is a separate comparison, never pooled. Within a comparison one sample is one
pretraining run (its latest evaluation of that kind), grouped by mask and identified by its seed.

Each group is tested against a baseline group (default `random`, else the best one): when at least
two seeds ran with both masks, by a paired t-test on the per-seed differences (the seed's images,
order and initial weights are shared, so pairing removes that noise); otherwise by Welch's t-test
(unequal variances), which is also reported beside the paired one. The report (Markdown + CSV) and
one chart per comparison and metric (every seed a point, mean ± std beside them) are written to
`--out` and logged as artifacts of a `compare` run in the same experiment.
"""

from __future__ import annotations

import argparse
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import cli


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m eval.compare`."""
    parser = cli.make_parser("python -m eval.compare", __doc__)
    parser.add_argument("--experiment", required=True, help="MLflow experiment to compare (required)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    parser.add_argument("--out", default="runs/compare", help="report folder (default: %(default)s)")
    parser.add_argument("--metrics", nargs="*", default=None,
                        help="default: every metric of the evaluation runs")
    parser.add_argument("--baseline", default="random", help="group the others are tested against")
    return parser


if __name__ == "__main__":  # --help and usage errors answer here, before pandas and torch load (seconds)
    cli.answer_early(build_parser())

from pipelines.cache import matplotlib_config

matplotlib_config()  # a font cache that lasts, also where HOME is not writable

import matplotlib
import pandas as pd
from scipy import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from configs.fingerprint import DATA_SIGNATURE, STEPS_PER_EPOCH, is_fingerprinted
from errors import run_cli
from eval.common import EVALUATION_TAG, SUMMARY_TAG
from tracking import Tracker, resolve_uri, sqlite_file, standard_tags

ALPHA = 0.05
NO_SPREAD = 1e-12  # a standard deviation below this is none (float noise of equal values)
FINGERPRINT_TAG = "colormae.fingerprint"
PARENT_TAG = "mlflow.parentRunId"
MASK_KEYS = ("mask.schedule", "mask.ratio", "mask.bank")
EVALUATE_HINT = "{command}   (or colormae-linear-probe / colormae-segmentation; --mlflow-uri as given here)"


@dataclass
class Comparison:
    """Evaluation results of pretraining runs with one fingerprint, under one evaluation."""

    fingerprint: str
    evaluation: str  # the evaluation's description
    samples: pd.DataFrame  # group, seed, run_id (pretraining), run_name, then one column per metric
    metrics: list[str]
    notes: list[str] = field(default_factory=list)


def fetch_runs(experiment: str, uri: str) -> pd.DataFrame:
    """All runs of an experiment, one row each: run_id, run_name, start_time, status, params.*, metrics.*,
    tags.*.

    Reads through its own client, so the process-wide tracking URI stays as it is. An experiment
    without runs gives an empty frame; a missing experiment or SQLite store a ValueError (the client
    would create an empty store: compare never writes one).
    """
    from mlflow.tracking import MlflowClient

    database = sqlite_file(uri)
    if database is not None and not database.is_file():
        raise ValueError(f"no MLflow store at {database}: train first, or name the store with --mlflow-uri")
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise ValueError(f"no MLflow experiment {experiment!r} at {uri}; experiments there: {names}")
    rows, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], max_results=1000, page_token=token)
        rows += [{"run_id": run.info.run_id, "run_name": run.info.run_name, "start_time": run.info.start_time,
                  "status": run.info.status,
                  **{f"params.{key}": value for key, value in run.data.params.items()},
                  **{f"metrics.{key}": value for key, value in run.data.metrics.items()},
                  **{f"tags.{key}": value for key, value in run.data.tags.items()}} for run in page]
        token = page.token
        if not token:
            break
    return pd.DataFrame(rows, columns=["run_id", "run_name", "start_time", "status"] if not rows else None)


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    """A column as strings ("" where missing), also when no run has it."""
    values = runs[name] if name in runs else pd.Series(None, index=runs.index, dtype=object)
    return values.fillna("").astype(str)


def _mask_label(pretrain: pd.DataFrame) -> pd.Series:
    """The mask schedule, plus each other mask setting that varies among these runs (e.g. ratio)."""
    label = _column(pretrain, "params.mask.schedule").where(lambda s: s != "", _column(pretrain, "tags.mask"))
    for key in MASK_KEYS[1:]:
        values = _column(pretrain, f"params.{key}")
        if values.nunique() > 1:
            label = label + f" {key.split('.')[1]}=" + values
    return label


def differing_keys(pretrain: pd.DataFrame) -> dict[str, list[str]]:
    """Fingerprinted settings that differ among these pretraining runs: key -> the distinct values."""
    columns = {c.removeprefix("params."): c for c in pretrain.columns
               if c.startswith("params.") and is_fingerprinted(c.removeprefix("params."))}
    columns[DATA_SIGNATURE] = "tags.colormae.data_signature"
    columns[STEPS_PER_EPOCH] = f"params.{STEPS_PER_EPOCH}"
    differing = {}
    for key, column in sorted(columns.items()):
        values = sorted(set(_column(pretrain, column)))
        if len(values) > 1:
            differing[key] = [value or "(not recorded)" for value in values]
    return differing


def find_comparisons(runs: pd.DataFrame) -> tuple[list[Comparison], list[str]]:
    """Split an experiment's runs into comparisons; also returns plain notes on what was left out and why."""
    runs = runs[_column(runs, "tags.evaluation") != "compare"]
    # an evaluation run: nested under its pretraining run (older ones only name it in pretrain_run_id)
    parent = _column(runs, f"tags.{PARENT_TAG}").where(_column(runs, "tags.evaluation") != "", "")
    parent = parent.where(parent != "", _column(runs, "tags.pretrain_run_id"))
    runs = runs.assign(parent=parent)
    evaluations, pretrain = runs[parent != ""], runs[parent == ""]
    if runs.empty:
        return [], ["The experiment has no runs yet: pretrain first, e.g. `make train` "
                    f"({cli.command('colormae-train', '--config', 'configs/demo.yaml')})."]
    if evaluations.empty:
        data = Path(_column(pretrain, "params.data.path").iloc[0] or "data/fashion-mnist/train").parent
        data = data.resolve() if data.is_dir() else data  # the pretraining split's root, from any folder
        run_uri = f"runs:/{pretrain['run_id'].iloc[0]}"
        knn = cli.command("colormae-knn", "--checkpoint", run_uri, "--data", str(data))
        return [], [f"No evaluation runs yet ({len(pretrain)} pretraining run(s)); evaluate each one, "
                    f"e.g.:\n\n    {EVALUATE_HINT.format(command=knn)}"]
    notes = []
    pretrain = pretrain.set_index("run_id").assign(
        fingerprint=_column(pretrain, f"tags.{FINGERPRINT_TAG}").values,
        group=_mask_label(pretrain).values,
        seed=_column(pretrain, "params.train.seed").values)
    orphans = ~evaluations["parent"].isin(pretrain.index)
    if orphans.any():
        notes.append(f"{orphans.sum()} evaluation run(s) left out: their pretraining run is not in this "
                     "experiment.")
    unfinished = _column(evaluations, "status").isin(["RUNNING", "FAILED", "KILLED", "SCHEDULED"])
    if unfinished.any():
        notes.append(f"{unfinished.sum()} evaluation run(s) left out: failed or not finished.")
    evaluations = evaluations[~orphans & ~unfinished]
    unfingerprinted = pretrain.loc[evaluations["parent"].unique()].query("fingerprint == ''")
    if len(unfingerprinted):
        notes.append(f"{len(unfingerprinted)} evaluated pretraining run(s) left out: no fingerprint recorded "
                     f"(trained before fingerprints existed?): {', '.join(unfingerprinted['run_name'])}.")
    unlabelled = _column(evaluations, f"tags.{EVALUATION_TAG}") == ""
    if unlabelled.any():
        notes.append(f"{unlabelled.sum()} evaluation run(s) left out: they do not record what they evaluated "
                     f"(tag {EVALUATION_TAG}; made by an older eval command?).")
    evaluations = evaluations[~unlabelled & ~evaluations["parent"].isin(unfingerprinted.index)]
    used = pretrain.loc[evaluations["parent"].unique()]
    if used["fingerprint"].nunique() > 1:
        keys = "; ".join(f"{key}: {' vs '.join(values)}" for key, values in differing_keys(used).items())
        notes.append(f"{used['fingerprint'].nunique()} pretraining fingerprints: their runs are compared "
                     f"separately, never pooled. Settings that differ: {keys or '(not recorded)'}.")

    comparisons = []
    evaluations = evaluations.assign(fingerprint=pretrain.loc[evaluations["parent"], "fingerprint"].values)
    for (fingerprint, _), part in evaluations.groupby(["fingerprint", f"tags.{EVALUATION_TAG}"], sort=False):
        comparisons.append(_comparison(fingerprint, part, pretrain))
    comparisons.sort(key=lambda c: (c.fingerprint, c.evaluation))
    return comparisons, notes


def _comparison(fingerprint: str, evaluations: pd.DataFrame, pretrain: pd.DataFrame) -> Comparison:
    """One comparison: the latest evaluation per pretraining run, with its mask group and seed."""
    notes = []
    latest = evaluations.sort_values("start_time").groupby("parent").tail(1)
    if len(latest) < len(evaluations):
        notes.append(f"{len(evaluations) - len(latest)} repeated evaluation(s) of the same checkpoint: "
                     "the latest of each is used.")
    metric_columns = [c for c in latest.columns if c.startswith("metrics.") and latest[c].notna().any()]
    runs = pretrain.loc[latest["parent"]]
    samples = pd.DataFrame({"group": runs["group"].values, "seed": runs["seed"].values,
                            "run_id": latest["parent"].values, "run_name": runs["run_name"].values})
    for column in metric_columns:
        samples[column.removeprefix("metrics.")] = latest[column].values
    repeated = samples[samples.duplicated(["group", "seed"], keep=False)]
    if len(repeated):
        names = ", ".join(f"{g} seed {s}" for g, s in repeated[["group", "seed"]].drop_duplicates().values)
        notes.append(f"Several pretraining runs share a mask and seed ({names}); each counts as a sample "
                     "but is left out of the per-seed pairing.")
    for group, part in samples.groupby("group"):
        if len(part) == 1:
            notes.append(f"{group} has one run (seed {part['seed'].iloc[0]}): no spread, no test possible.")
    if samples["group"].nunique() == 1:
        notes.append(f"Only one mask ({samples['group'].iloc[0]}): nothing to compare it with.")
    description = _column(evaluations, f"tags.{SUMMARY_TAG}").iloc[0]
    return Comparison(fingerprint, description, samples.sort_values(["group", "seed"]),
                      [c.removeprefix("metrics.") for c in metric_columns], notes)


def summarise(samples: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Long table: group, metric, mean, std (sample std, ddof=1), n, seeds."""
    rows = []
    for group, part in samples.groupby("group", sort=False):
        for metric in metrics:
            values = part.dropna(subset=[metric]) if metric in part else part.iloc[:0]
            if len(values):
                seeds = ",".join(str(s) for s in values["seed"]) if "seed" in values else ""
                rows.append({"group": group, "metric": metric, "mean": values[metric].mean(),
                             "std": values[metric].std(ddof=1) if len(values) > 1 else math.nan,
                             "n": len(values), "seeds": seeds})
    return pd.DataFrame(rows, columns=["group", "metric", "mean", "std", "n", "seeds"])


def _per_seed(part: pd.DataFrame, metric: str) -> pd.Series:
    """A group's values indexed by seed; seeds that occur more than once are dropped (cannot pair)."""
    values = part.dropna(subset=[metric])
    if "seed" not in values:
        return pd.Series(dtype=float)
    values = values[~values["seed"].duplicated(keep=False)]
    return values.set_index("seed")[metric]


def _has_spread(*samples: pd.Series) -> bool:
    """Whether any sample varies: a t-test against no spread at all is undefined, not significant."""
    return any(len(sample) > 1 and sample.std(ddof=1) > NO_SPREAD for sample in samples)


def difference_verdict(values: pd.DataFrame, reference: pd.DataFrame, metric: str) -> str:
    """One group against the reference on one metric: the difference, which test and why, the verdict."""
    a, b = values[metric].dropna(), reference[metric].dropna()
    seeds_a, seeds_b = _per_seed(values, metric), _per_seed(reference, metric)
    common = sorted(set(seeds_a.index) & set(seeds_b.index), key=str)
    two_each = len(a) >= 2 and len(b) >= 2
    welch = stats.ttest_ind(a, b, equal_var=False).pvalue if two_each and _has_spread(a, b) else None
    if len(common) >= 2:
        differences = seeds_a[common] - seeds_b[common]
        text = f"{differences.mean():+.4f} (mean per-seed difference); "
        if not _has_spread(differences):
            seeds = ", ".join(map(str, common))
            if (differences.abs() <= NO_SPREAD).all():
                return text + f"the same score on every seed ({seeds}): no difference"
            return text + (f"cannot tell: seeds {seeds} all differ by exactly this much, so the paired "
                           "t-test has no spread to weigh it against; run more seeds")
        p_value = stats.ttest_rel(seeds_a[common], seeds_b[common]).pvalue
        unpaired = len(a) + len(b) - 2 * len(common)
        left = f"; {unpaired} unpaired run(s) left out of it" if unpaired else ""
        text += (f"paired t-test, since seeds {', '.join(map(str, common))} ran with both masks{left}: "
                 f"p = {p_value:.3f}")
    elif welch is not None:
        p_value = welch
        why = f"only seed {common[0]} ran with both" if common else "no seed ran with both masks"
        text = (f"{a.mean() - b.mean():+.4f} (difference of means); Welch's t-test, since {why}: "
                f"p = {p_value:.3f}")
    elif two_each:
        return f"{a.mean() - b.mean():+.4f}; cannot tell: every run of each mask scored the same (no spread)"
    else:
        return (f"{a.mean() - b.mean():+.4f}; cannot tell: needs two seeds with both masks (paired t-test) "
                f"or two runs per mask (Welch's t-test)")
    verdict = "within seed noise" if p_value >= ALPHA else "beyond seed noise"
    text += f" -> {verdict} (alpha {ALPHA})"
    if len(common) >= 2 and welch is not None:
        text += f"; Welch's t-test, for reference: p = {welch:.3f}"
    return text


def noise_verdicts(samples: pd.DataFrame, metrics: list[str], baseline: str | None = "random") -> list[str]:
    """One line per (metric, group): the difference to the baseline group and whether it is seed noise."""
    lines = []
    for metric in metrics:
        groups = {g: part for g, part in samples.groupby("group")
                  if metric in part and part[metric].notna().any()}
        if len(groups) < 2:
            continue
        reference = baseline if baseline in groups else max(groups, key=lambda g: groups[g][metric].mean())
        for group, part in groups.items():
            if group != reference:
                lines.append(f"- {metric}: {group} - {reference} = "
                             f"{difference_verdict(part, groups[reference], metric)}")
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


def seed_chart(samples: pd.DataFrame, metric: str, path: Path, title: str) -> None:
    """Per group: every seed as a point (one colour per seed) and, beside them, the mean ± std."""
    groups = list(dict.fromkeys(samples["group"]))
    seeds = sorted(samples["seed"].unique(), key=str) if "seed" in samples else [""]
    figure, axes = plt.subplots(figsize=(max(5.0, 1.4 * len(groups) + 2), 4.0))
    colours, labelled = plt.get_cmap("tab10"), set()
    for x, group in enumerate(groups):
        part = samples[(samples["group"] == group)].dropna(subset=[metric])
        for i, seed in enumerate(seeds):
            points = part[part["seed"] == seed][metric] if "seed" in part else part[metric]
            offset = -0.3 + 0.25 * i / max(1, len(seeds) - 1)
            label = f"seed {seed}" if len(points) and seed not in labelled else None
            labelled.update([seed] if len(points) else [])
            axes.scatter([x + offset] * len(points), points, color=colours(i % 10), s=28, zorder=3,
                         label=label)
        std = part[metric].std(ddof=1) if len(part) > 1 else 0.0
        axes.errorbar(x + 0.15, part[metric].mean(), yerr=std, fmt="D", color="black", capsize=5, zorder=4,
                      label="mean ± std" if x == 0 else None)
    long_names = max(map(len, groups)) > 8
    axes.set_xticks(range(len(groups)), groups, rotation=20 if long_names else 0,
                    ha="right" if long_names else "center")
    axes.set_xlim(-0.7, len(groups) - 0.3)
    axes.set_ylabel(metric)
    axes.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(comparisons: list[Comparison], notes: list[str], out: Path, baseline: str | None = "random",
                 title: str = "Comparison", metrics: list[str] | None = None) -> list[Path]:
    """comparison.md, comparison.csv and <n>-<metric>.png charts under `out`; returns the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out / "comparison.md", out / "comparison.csv"
    sections, tables, charts = [f"# {title}\n"], [], []
    if notes:
        sections.append("## Found\n\n" + "\n".join(f"- {note}" for note in notes) + "\n")
    for number, comparison in enumerate(comparisons, 1):
        chosen = [m for m in comparison.metrics if metrics is None or m in metrics]
        summary = summarise(comparison.samples, chosen)
        tables.append(summary.assign(comparison=number, fingerprint=comparison.fingerprint,
                                     evaluation=comparison.evaluation))
        verdicts = noise_verdicts(comparison.samples, chosen, baseline)
        body = [f"## Comparison {number}: fingerprint {comparison.fingerprint}, "
                f"{comparison.samples['run_id'].nunique()} pretraining run(s)\n",
                f"Evaluation: {comparison.evaluation}\n", "mean ± sample std (number of runs)\n",
                markdown_table(summary) + "\n", "### Differences between masks: beyond seed noise?\n",
                "\n".join(verdicts) or "- nothing to test", ""]
        body += [f"- note: {note}" for note in comparison.notes]
        for metric in chosen:
            charts.append(out / f"{number}-{metric.replace('/', '_')}.png")
            seed_chart(comparison.samples, metric, charts[-1],
                       f"{metric}, comparison {number} (fingerprint {comparison.fingerprint})")
            body.append(f"\n![{metric}]({charts[-1].name})")
        sections.append("\n".join(body) + "\n")
    columns = ["comparison", "fingerprint", "evaluation", "group", "metric", "mean", "std", "n", "seeds"]
    table = pd.concat(tables) if tables else pd.DataFrame(columns=columns)
    table[columns].to_csv(csv_path, index=False)
    md_path.write_text("\n".join(sections))
    return [md_path, csv_path, *charts]


def main(argv: list[str] | None = None) -> list[Path]:
    """Command line: read an experiment, write and log the comparison (bad input: a ValueError)."""
    args = build_parser().parse_args(argv)

    uri = resolve_uri(args.mlflow_uri, "runs")
    comparisons, notes = find_comparisons(fetch_runs(args.experiment, uri))
    available = sorted({m for c in comparisons for m in c.metrics})
    unknown = sorted(set(args.metrics or []) - set(available))
    if unknown:
        raise ValueError(f"metrics {unknown} are not in experiment {args.experiment!r}; "
                         f"available: {available}")
    paths = write_report(comparisons, notes, Path(args.out), args.baseline,
                         f"{args.experiment}: mask comparisons", args.metrics)
    if comparisons:
        tags = {"evaluation": "compare", **standard_tags("eval.compare")}  # Source and Created by
        tracker = Tracker(uri, args.experiment, run_name="compare", tags=tags)
        for path in paths:
            tracker.log_artifact(path, artifact_path="comparison")
        tracker.close()
    print(paths[0].read_text())
    return paths


if __name__ == "__main__":
    run_cli(main)  # an expected failure is one line; --debug shows the traceback
