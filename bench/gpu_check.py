"""One command that exercises and measures every GPU path, for the first minutes on a GPU node.

    python3 -m bench.gpu_check                        # one GPU, <= 8 minutes; results in runs/gpu-check/
    python3 -m bench.gpu_check --write-docs           # also docs/gpu-results.md and docs/gpu-results.json
    python3 -m bench.gpu_check --wheels gpu-wheels    # bring missing packages (omegaconf, DALI) as wheels
    python3 -m bench.gpu_check --smoke                # every part on the CPU at toy sizes (what CI runs)

It runs in whatever Python environment is active (no set-up step, nothing fetched): a GPU image with
torch, torchvision, timm, CuPy and numpy is enough. It prints the plan with each part's budget, then
runs each part in its own process under that budget; a part that fails or runs out of time is
recorded and the next one starts. A part whose package is missing is recorded as
`skipped: missing <package>`. Parts:

1. pytest-gpu: `pytest -m gpu`, every GPU twin (CuPy masks, DALI mixed, device transfer, bf16);
2. masks: `bench.masks --device cuda`, the CuPy mask stage against torch argsort masking;
3. corpus: the ImageNet-like JPEG corpus (`pipelines.prepare jpeg-corpus`), unless --data is given;
4. loaders: `bench.loaders --device cuda` at S=224, batch 256: torch, DALI 'mixed', FFCV ToDevice
   and the plain torchvision ImageFolder peer, with and without masks, against GPU decode-only;
5. train-step: `bench.train_step`, ViT-B/16 MAE, bf16, batch 256, eager and torch.compile, MFU,
   peak memory, host syncs, the public-MAE-style peer step, the largest batch that fits;
6. e2e-<loader>: `train.py` for 200 steps on the corpus with each loader, no checkpoint files
   (`train.checkpoint_every=0`): images/s and data wait, read from the run's summary.json.

The colour-comparison reproduction is its own command (`python -m eval.reproduce --budget gpu`,
about 8 minutes): it does not fit beside these parts in one 480 s check.

Writes, all in one small folder (runs/gpu-check/; no checkpoints, no images): gpu-check.json (one
row per measurement, each with the GPU, driver, CUDA and package versions), gpu-check.md (the
summary, with the issue's targets), logs/<part>.log and each e2e run's summary.json. The JPEG corpus
goes to the cache ($COLORMAE_CACHE or ~/.cache/colormae), not to the results.

--wheels DIR installs every wheel in DIR with `pip install --no-index --no-deps --target <tmp>`, then
runs the check again with <tmp> first on PYTHONPATH, so the plan (what is missing, which versions)
and every part import from it: `make gpu-wheels` fills gpu-wheels/ with omegaconf (the trainer's
config, pure Python, under 1 MB); add DALI's wheel (nvidia-dali-cuda130, ~200 MB) and any other
package the image lacks. Nothing is installed into the environment itself. `make gpu-rehearsal`
runs this check's --smoke twin in a virtual environment holding exactly a bare GPU image's packages
(requirements-gpu-image.txt).

Run it from the repository root (`-m` puts the root on the import path; no install is needed); each
part runs there too, as `python -m bench.<name>` or `python train.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.deps import missing, skip_reason, version
from pipelines.backends import BACKENDS, optional_packages
from pipelines.prepare import PHOTO_SOURCES
from tracking import nvidia_smi

ROOT = Path(__file__).resolve().parent.parent
TOTAL_S = 480  # the whole check, on one H100/H200, torch.compile's warm-up included
SMOKE_SLACK = 2  # --smoke: budgets and total x2, for a busy CI machine (toy sizes; nothing is judged)
WHEELS_ENV = "GPU_CHECK_WHEELS"  # set in the re-run that --wheels starts: the folder they went to
E2E_STEPS = 200
# top-level modules of the packages a GPU image may lack
OPTIONAL = {"mlflow", "cupy", *(module.split(".")[0] for module in optional_packages())}
TRAINER = "omegaconf"  # what train.py needs beyond a bare GPU image (it travels with --wheels)


@dataclass
class Sizes:
    """What each part runs at: the issue's sizes on a GPU, toy sizes for --smoke on the CPU."""

    device: str
    corpus_n: int
    img_size: int
    batch: int
    model: str
    mask_batches: str
    train_args: list[str]
    e2e_steps: int
    e2e_every: int


GPU = Sizes(device="cuda", corpus_n=8000, img_size=224, batch=256, model="vit_base", mask_batches="256,4096",
            train_args=["--compile", "--largest"], e2e_steps=E2E_STEPS, e2e_every=20)
SMOKE = Sizes(device="cpu", corpus_n=48, img_size=64, batch=8, model="demo", mask_batches="8,64",
              train_args=["--compile", "--compile-backend", "eager", "--largest", "--max-batch", "16",
                          "--steps", "2", "--warmup", "1", "--rounds", "1"], e2e_steps=6, e2e_every=2)


@dataclass
class Part:
    name: str
    budget_s: float
    command: list[str]
    read: Callable[[Part, Path], list[dict]]  # (part, run folder) -> rows
    skip: str | None = None  # decided when planning
    needs_corpus: bool = False
    status: str = "not run"
    seconds: float = 0.0
    rows: list[dict] = field(default_factory=list)


# -- the environment ---------------------------------------------------------------------------

def run_with_wheels(folder: Path, argv: list[str]) -> int:
    """Install the wheels in `folder` into a temporary folder, then run the same check again with that
    folder first on PYTHONPATH: the plan (what is missing, which versions) and every part import from
    it. Returns the check's exit code; the folder is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-wheels-") as target:
        install_wheels(folder, Path(target))
        path = os.pathsep.join(filter(None, [target, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, WHEELS_ENV: target}
        return subprocess.run([sys.executable, "-m", "bench.gpu_check", *argv], cwd=ROOT, env=env).returncode


def install_wheels(folder: Path, target: Path) -> None:
    """pip-install every wheel in `folder` (no index, no dependencies) into `target`."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"error: --wheels {folder}: no .whl files there")
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", str(target)]
    if subprocess.run([*pip, *map(str, wheels)]).returncode:
        raise SystemExit(f"error: --wheels {folder}: pip could not install them (its message is above)")


def environment() -> dict:
    """GPU name, driver, CUDA and the versions of the packages the parts use."""
    import torch

    found = nvidia_smi("name", "driver_version")
    gpu = found.get("name") or (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)")
    return {"gpu": gpu, "driver": found.get("driver_version"), "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": version("torchvision"), "timm": version("timm"),
            "numpy": version("numpy"), "cupy": version("cupy"),
            **{name: version(next(iter(b.packages))) for name, b in BACKENDS.items() if b.packages},
            "mlflow": version("mlflow"), "omegaconf": version("omegaconf"), "cpus": os.cpu_count()}


# -- reading what each part wrote --------------------------------------------------------------

def read_json_rows(part: Part, out: Path) -> list[dict]:
    """Rows of a bench script's JSON: every entry of its lists, tagged with the list's name."""
    path = out / f"{part.name}.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    rows = []
    for key, value in data.items():
        if isinstance(value, list):
            rows += [{"table": key, **item} for item in value if isinstance(item, dict)]
    scalars = {k: v for k, v in data.items() if not isinstance(v, list | dict)}
    nested = {k: v for k, v in data.items() if isinstance(v, dict)}
    return [*rows, {"table": "summary", **scalars, **nested}]


def read_pytest(part: Part, out: Path) -> list[dict]:
    """Counts from pytest's JUnit XML. A test that failed only because an optional package is missing
    (mlflow, DALI, FFCV, CuPy) is listed under missing_package, not as a failure; a test module that
    cannot be collected is a failure, whatever it lacks (its GPU tests would never run)."""
    path = out / "pytest-gpu.xml"
    if not path.exists():
        return []
    counts = {"passed": 0, "failed": 0, "skipped": 0, "missing_package": [], "failures": []}
    for case in ET.parse(path).getroot().iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        name = f"{case.get('classname')}::{case.get('name')}"
        if problem is None:
            counts["skipped" if case.find("skipped") is not None else "passed"] += 1
            continue
        absent = re.search(r"No module named '([\w.]+)'", f"{problem.get('message')} {problem.text}")
        collecting = problem.get("message") == "collection failure"  # pytest's JUnit word for it
        if absent and absent.group(1).split(".")[0] in OPTIONAL and not collecting:
            counts["missing_package"].append(f"{name} ({absent.group(1)})")
        else:
            counts["failed"] += 1
            counts["failures"].append(name)
    return [{"table": "pytest -m gpu", **counts}]


def read_train_summary(part: Part, out: Path) -> list[dict]:
    """images/s (median) and data-wait share (mean) of train.py's log windows after the first
    (start-up), as its report writes them to <run folder>/summary.json."""
    loader = part.name.removeprefix("e2e-")
    path = out / "e2e" / loader / "summary.json"
    if not path.exists():
        return []
    summary = json.loads(path.read_text())
    return [{"table": "train.py", "loader": loader, **{key: summary[key] for key in
                                                       ("steps", "images_per_s", "data_wait", "loss")}}]


# -- the plan ----------------------------------------------------------------------------------

def plan(args: argparse.Namespace, out: Path, corpus: Path) -> list[Part]:
    """Every part with its command and budget (480 s in all on a GPU); skips known before running."""
    s, py = (SMOKE if args.smoke else GPU), sys.executable
    tests = sorted((ROOT / "tests").glob("test_*.py"))
    gpu_tests = [str(path) for path in tests if "mark.gpu" in path.read_text()]  # less to collect
    parts = [
        Part("pytest-gpu", 60, [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                "--continue-on-collection-errors", f"--junitxml={out / 'pytest-gpu.xml'}",
                                *gpu_tests], read_pytest, skip=skip_reason("pytest")),
        Part("masks", 30, [py, "-m", "bench.masks", "--device", s.device, "--batches", s.mask_batches,
                           "--json", str(out / "masks.json"), *(["--seconds", "0.05", "--repeats", "1"]
                                                                if args.smoke else [])],
             read_json_rows, skip=skip_reason("cupy") if s.device == "cuda" else None),
    ]
    if args.data is None:
        photos = [module for module, _ in PHOTO_SOURCES]
        absent = missing(*photos)
        parts.append(Part("corpus", 30, [py, "-m", "pipelines.prepare", "jpeg-corpus", "--out", str(corpus),
                                         "--n", str(s.corpus_n)], lambda part, out: [],
                          skip=f"skipped: missing one of {', '.join(absent)} (or pass --data DIR)"
                          if len(absent) == len(photos) else None))
    loaders = ",".join([*(name for name, b in BACKENDS.items() if not (args.smoke and b.slow_start)),
                        "imagefolder"])
    parts.append(Part("loaders", 80, [py, "-m", "bench.loaders", "--data", str(corpus), "--device",
                                      s.device, "--loaders", loaders, "--img-size", str(s.img_size),
                                      "--batch-size", str(s.batch), "--rounds", "1" if args.smoke else "2",
                                      *(["--workers", "2"] if args.smoke else []),
                                      "--json", str(out / "loaders.json")],
                      read_json_rows, needs_corpus=True))
    parts.append(Part("train-step", 140, [py, "-m", "bench.train_step", "--models", s.model,
                                          "--inputs", "synthetic", "--batch", str(s.batch), *s.train_args,
                                          "--json", str(out / "train-step.json")], read_json_rows))
    for loader, backend in BACKENDS.items():
        reason = skip_reason(TRAINER, *backend.packages)
        if args.smoke and backend.slow_start and not reason:
            reason = f"skipped: --smoke ({backend.slow_start})"
        parts.append(Part(f"e2e-{loader}", 45, e2e_command(loader, s, corpus, out), read_train_summary,
                          skip=reason, needs_corpus=True))
    if args.smoke:
        for part in parts:
            part.budget_s *= SMOKE_SLACK
    if args.parts:
        wanted = args.parts.split(",")
        unknown = set(wanted) - {p.name for p in parts}
        if unknown:
            raise SystemExit(f"error: --parts: unknown {', '.join(sorted(unknown))}; "
                             f"choose from {', '.join(p.name for p in parts)}")
        parts = [p for p in parts if p.name in wanted]
    return parts


def e2e_command(loader: str, s: Sizes, corpus: Path, out: Path) -> list[str]:
    """train.py for about `s.e2e_steps` steps with `loader` (no MLflow, figures or checkpoint files)."""
    steps_per_epoch = max(1, s.corpus_n // s.batch)
    epochs = math.ceil(s.e2e_steps / steps_per_epoch)
    overrides = {"model.preset": s.model, "data.path": corpus, "data.loader": loader,
                 "data.img_size": s.img_size, "train.batch_size": s.batch, "train.epochs": epochs,
                 "train.steps_per_epoch": math.ceil(s.e2e_steps / epochs), "train.warmup_epochs": 0,
                 "train.device": "cuda" if s.device == "cuda" else "cpu", "log.mlflow": "false",
                 "log.recon_every": 0, "log.every_steps": s.e2e_every, "log.runs_root": out / "e2e",
                 "log.run_name": loader, "train.checkpoint_every": 0}
    if s.device == "cpu":
        overrides["data.workers"] = 2
    return [sys.executable, str(ROOT / "train.py"), *(f"{k}={v}" for k, v in overrides.items())]


def default_corpus(smoke: bool) -> Path:
    """Where the JPEG corpus is cut when --data is not given: the cache, outside the results folder."""
    root = os.environ.get("COLORMAE_CACHE")
    cache = Path(root) if root else Path.home() / ".cache" / "colormae"
    return cache / f"jpeg-corpus-{(SMOKE if smoke else GPU).corpus_n}"


# -- running -----------------------------------------------------------------------------------

def run_part(part: Part, env: dict, out: Path, timeout: float) -> None:
    """Run one part in its own process group under `timeout`; record status, seconds and rows."""
    log = out / "logs" / f"{part.name}.log"
    start = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen(part.command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
            part.status = "ok" if code == 0 else f"failed: exit code {code}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the part and its workers
            process.wait()
            part.status = f"timeout after {timeout:.0f} s"
    part.seconds = time.perf_counter() - start
    try:
        part.rows = part.read(part, out)
    except (OSError, ValueError, KeyError, ET.ParseError) as err:
        part.status += f"; results unreadable: {err}"
    if part.name == "pytest-gpu" and part.rows:  # a missing optional package is not a failure
        part.status = f"failed: {part.rows[0]['failed']} tests" if part.rows[0]["failed"] else "ok"
    elif part.status == "ok" and not part.rows and part.name.startswith("e2e-"):
        part.status = "failed: no step metrics in train.py's log"
    if not part.status.startswith("ok"):
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        print(f"  {part.name}: {part.status}\n    " + "\n    ".join(tail), flush=True)


def run(args: argparse.Namespace) -> int:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    shutil.rmtree(out / "e2e", ignore_errors=True)  # train.py would resume an earlier check's runs
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}  # PASSIVE: as train.py sets

    import torch

    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; `python3 -m bench.gpu_check --smoke` runs the CPU twin")
    corpus = args.data or default_corpus(args.smoke)
    parts = plan(args, out, corpus)
    info = environment()
    total = args.total or TOTAL_S * (SMOKE_SLACK if args.smoke else 1)
    print(f"GPU check ({'smoke, CPU' if args.smoke else info['gpu']}): {len(parts)} parts, at most {total} s")
    for part in parts:
        print(f"  {part.name:12s} {part.skip or f'budget {part.budget_s:.0f} s'}")
    deadline = time.perf_counter() + total
    for part in parts:
        left = deadline - time.perf_counter()
        corpus_failed = part.needs_corpus and any(p.name == "corpus" and not p.status.startswith("ok")
                                                  and not p.skip for p in parts)
        if part.skip:
            part.status = part.skip
        elif part.needs_corpus and (corpus_failed or not corpus.is_dir()):
            part.status = "skipped: no JPEG corpus (the corpus part did not finish)"
        elif left < 10:
            part.status = f"skipped: the {total} s total is used up"
        else:
            print(f"[{part.name}] budget {min(part.budget_s, left):.0f} s", flush=True)
            run_part(part, env, out, min(part.budget_s, left))
            print(f"[{part.name}] {part.status} in {part.seconds:.0f} s", flush=True)
    rows = [{"part": p.name, **row, **info} for p in parts for row in p.rows]
    rows += [{"part": p.name, "status": p.status, "seconds": round(p.seconds, 1), **info} for p in parts]
    summary = markdown(parts, info, args)
    (out / "gpu-check.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "gpu-check.md").write_text(summary)
    if args.write_docs:
        (ROOT / "docs" / "gpu-results.md").write_text(summary)
        (ROOT / "docs" / "gpu-results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(summary)
    bad = [p.name for p in parts if not (p.status.startswith("ok") or p.status.startswith("skipped"))]
    print(f"written: {out / 'gpu-check.json'}, {out / 'gpu-check.md'}"
          + (f"; NOT OK: {', '.join(bad)}" if bad else "; every part ok or skipped"))
    return 1 if bad else 0


# -- the summary -------------------------------------------------------------------------------

def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table of `rows` (columns: the given ones, else every key in order of appearance)."""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")).replace("|", "/") for c in columns) + " |")
    return "\n".join(lines)


def targets(parts: dict[str, Part], smoke: bool) -> list[dict]:
    """The issue's targets against what was measured (not judged in --smoke: toy sizes on a CPU)."""
    def rows(name: str, table_name: str) -> list[dict]:
        return [r for r in parts[name].rows if r.get("table") == table_name] if name in parts else []

    checks = []

    def check(target: str, measured: float | None, ok: bool) -> None:
        if measured is not None:
            checks.append({"target": target, "measured": round(measured, 3),
                           "met": "n/a (smoke)" if smoke else ("yes" if ok else "NO")})

    ratios = next(iter(rows("masks", "summary")), {}).get("ratios_vs_random_torch", {})
    if ratios:
        worst_small = min(next(iter(r.values())) for r in ratios.values())  # the first batch (256)
        worst_large = min(list(r.values())[-1] for r in ratios.values())  # the last (4096)
        check("masks: every colour >= 2x torch argsort masking at B=256", worst_small, worst_small >= 2)
        check("masks: every colour >= 1x torch argsort masking at B=4096", worst_large, worst_large >= 1)
    loader_rows = [r for r in rows("loaders", "results") if "images_per_s" in r]
    masked = [r for r in loader_rows if r.get("mask")]
    if masked:
        best = max(masked, key=lambda r: r["images_per_s"])
        check(f"loaders: best backend ({best['loader']}, masks) >= 0.8x decode-only", best["vs_decode_only"],
              best["vs_decode_only"] >= 0.8)
        worst = max(r["mask_stage_share"] for r in masked)
        check("loaders: mask stage <= 2% of the epoch (worst backend)", worst, worst <= 0.02)
        peer = next((r["images_per_s"] for r in loader_rows if r["loader"] == "imagefolder"), None)
        torch_rate = next((r["images_per_s"] for r in masked if r["loader"] == "torch"), None)
        if peer and torch_rate:
            check("loaders: torch backend (masks) / ImageFolder peer", torch_rate / peer, torch_rate > peer)
    train = rows("train-step", "results")
    if train:
        best = max(train, key=lambda r: r["images_per_s"])
        check(f"train step: {best['model']} >= 4000 img/s per GPU (compile={best['compile']})",
              best["images_per_s"], best["images_per_s"] >= 4000)
    baseline = rows("train-step", "baseline")
    if baseline:
        best_rate = max(r["images_per_s"] for r in train)
        speedup = best_rate / baseline[0]["public_style_images_per_s"]
        check("train step: >= 1.3x the public-MAE-style step", speedup, speedup >= 1.3)
    waits = [row for name in BACKENDS for row in rows(f"e2e-{name}", "train.py")]
    if waits:
        best = min(waits, key=lambda r: r["data_wait"])
        check(f"train.py: data wait <= 5% with the best loader ({best['loader']})", best["data_wait"],
              best["data_wait"] <= 0.05)
    return checks


def markdown(parts: list[Part], info: dict, args: argparse.Namespace) -> str:
    command = "python3 -m bench.gpu_check" + " ".join(["", *sys.argv[1:]])
    lines = [f"# GPU check{' (smoke: CPU, toy sizes)' if args.smoke else ''}", "",
             f"`{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.", "", "## Environment", "",
             table([info]), "", "## Parts", "",
             table([{"part": p.name, "status": p.status, "seconds": round(p.seconds, 1),
                     "budget_s": round(p.budget_s)} for p in parts]), "", "## Targets", ""]
    checks = targets({p.name: p for p in parts}, args.smoke)
    lines += [table(checks) if checks else "No target could be measured.", ""]
    for part in parts:
        if part.rows:
            lines += [f"## {part.name}", ""]
            for name in dict.fromkeys(r["table"] for r in part.rows):
                chosen = [{k: v for k, v in r.items() if k != "table"}
                          for r in part.rows if r["table"] == name]
                lines += [f"{name}:", "", table(chosen), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU at toy sizes")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check", help="results folder")
    parser.add_argument("--data", type=Path, help="JPEG class folder for loaders and e2e (default: corpus)")
    parser.add_argument("--wheels", type=Path, help="folder of wheels to install into a temporary target")
    parser.add_argument("--parts", help="comma list: run only these parts")
    parser.add_argument("--total", type=int, help=f"seconds for the whole check (default {TOTAL_S}; "
                        f"x{SMOKE_SLACK} with --smoke)")
    parser.add_argument("--write-docs", action="store_true",
                        help="also write docs/gpu-results.md and docs/gpu-results.json")
    args = parser.parse_args(argv)
    if args.wheels and WHEELS_ENV not in os.environ:
        return run_with_wheels(args.wheels, sys.argv[1:] if argv is None else argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
