"""bench/gpu_check.py: the --smoke CPU twin of the GPU check, its skips, and the numbers it reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import gpu_check, train_step
from model import build_mae
from noise import MaskGenerator, mask_to_torch

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = '''
import sys

class _Blocker:
    """Makes mlflow, DALI and FFCV unimportable, as on a GPU image that lacks them."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlflow", "ffcv") or name.startswith(("nvidia.dali.", "nvidia.dali")):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, _Blocker())
'''


def run_check(tmp_path: Path, *args: str, block: bool = False) -> tuple[subprocess.CompletedProcess, dict]:
    """`python -m bench.gpu_check --smoke` in a fresh process; its rows grouped by part."""
    env = {**os.environ, "COLORMAE_CACHE": str(tmp_path / "cache")}
    if block:
        (tmp_path / "blocker").mkdir()
        (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "blocker"), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--out", str(tmp_path / "out"),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    rows: dict[str, list[dict]] = {}
    path = tmp_path / "out" / "gpu-check.json"
    for row in json.loads(path.read_text()) if path.exists() else []:
        rows.setdefault(row["part"], []).append(row)
    return done, rows


def status(rows: dict, part: str) -> str:
    return next(row["status"] for row in rows[part] if "status" in row)


@pytest.mark.slow
def test_smoke_runs_every_part_on_the_cpu(tmp_path):
    done, rows = run_check(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    plan = done.stdout.split("[pytest-gpu]")[0]  # printed before anything runs, with the budgets
    assert all(f"{name}" in plan for name in ("masks", "loaders", "train-step", "e2e-torch"))
    measured = ("pytest-gpu", "masks", "loaders", "train-step", "e2e-torch", "e2e-dali")
    for part in measured:
        assert status(rows, part) == "ok", (part, rows[part])
        assert any("status" not in row for row in rows[part]), f"{part} recorded no measurement"
    for row in (row for part_rows in rows.values() for row in part_rows):
        assert {"gpu", "driver", "cuda", "torch", "dali", "cupy"} <= set(row)
    loaders = {r["loader"]: r for r in rows["loaders"] if r.get("table") == "results" and not r.get("mask")}
    assert loaders["imagefolder"]["images_per_s"] > 0 and loaders["torch"]["images_per_s"] > 0
    train = [r for r in rows["train-step"] if r.get("table") == "results"]
    assert {r["compile"] for r in train} == {False, "eager"}
    assert all(r["gflops_per_image"] > 0 for r in train)
    e2e = next(r for r in rows["e2e-torch"] if r.get("table") == "train.py")  # from the run's summary.json
    assert e2e["steps"] == 6 and 0 <= e2e["data_wait"] < 1 and e2e["images_per_s"] > 0 and e2e["loss"] > 0
    results = list((tmp_path / "out").rglob("*"))  # one small folder: no checkpoints, no corpus
    assert not [path for path in results if path.suffix in (".pth", ".JPEG", ".jpg")]
    assert sum(path.stat().st_size for path in results if path.is_file()) < 2**20
    summary = (tmp_path / "out" / "gpu-check.md").read_text()
    assert "## Targets" in summary and "n/a (smoke)" in summary


@pytest.mark.slow
@pytest.mark.timeout(2400)  # a cold environment build (~7 min on a busy 2-core CI machine) + the check
def test_rehearsal_in_a_bare_gpu_images_environment(tmp_path):
    """`make gpu-rehearsal`: the smoke check and the GPU tests' collection in a virtual environment of
    exactly requirements-gpu-image.txt (no mlflow, DALI, FFCV, omegaconf: it travels as a wheel).
    The environment is built on first use (minutes, from the local wheels) and cached."""
    env = {**os.environ, "GPU_REHEARSAL_OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", "scripts/gpu_rehearsal.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=2300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["part"]: row for row in json.loads((tmp_path / "out" / "gpu-check.json").read_text())
            if "status" in row}
    assert rows["e2e-dali"]["status"] == "skipped: missing nvidia-dali-cuda130"
    assert rows["e2e-ffcv"]["status"] == "skipped: missing ffcv"
    for part in ("pytest-gpu", "masks", "corpus", "loaders", "train-step", "e2e-torch"):
        assert rows[part]["status"] == "ok", rows[part]
    assert rows["e2e-torch"]["mlflow"] is None and rows["e2e-torch"]["omegaconf"] == "2.4.0"


def test_train_without_mlflow_stops_in_validation_with_one_line(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run([sys.executable, "train.py", "--config", "configs/demo.yaml", "log.mlflow=true",
                           f"log.runs_root={tmp_path / 'runs'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    assert "log.mlflow is true but mlflow is not installed here" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()


def test_check_imports_need_no_mlflow_dali_or_ffcv(tmp_path):
    """The modules the check runs import cleanly where mlflow, DALI and FFCV are missing."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    modules = ["bench.gpu_check", "bench.masks", "bench.loaders", "bench.train_step", "pipelines",
               "pipelines.prepare", "pipelines.torch_loader", "noise", "model", "train"]
    script = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    script += "assert not {'mlflow', 'ffcv', 'nvidia.dali'} & set(sys.modules)\n"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_gpu_test_module_that_cannot_be_collected_is_a_failure(tmp_path):
    """A missing optional package inside a test is a missing package; a test module that cannot even
    be imported is a failure whatever it lacks: its GPU tests would never run."""
    (tmp_path / "test_collect.py").write_text("import mlflow_absent\n\ndef test_never():\n    pass\n")
    (tmp_path / "test_inside.py").write_text("def test_needs_it():\n    import mlflow_absent\n")
    (tmp_path / "test_fine.py").write_text("def test_fine():\n    pass\n")
    options = ["-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "--continue-on-collection-errors",
               f"--junitxml={tmp_path / 'pytest-gpu.xml'}"]
    subprocess.run([sys.executable, "-m", "pytest", *options, str(tmp_path)], cwd=tmp_path, timeout=120,
                   capture_output=True)
    part = gpu_check.Part("pytest-gpu", 1, [], gpu_check.read_pytest)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu_check, "OPTIONAL", {"mlflow_absent"})
        [counts] = gpu_check.read_pytest(part, tmp_path)
    assert (counts["passed"], counts["failed"]) == (1, 1)
    assert counts["failures"] == ["::test_collect"]
    assert counts["missing_package"] == ["test_inside::test_needs_it (mlflow_absent)"]


def test_wheels_install_into_a_target_the_parts_can_import(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "probe_pkg-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("probe_pkg/__init__.py", "VALUE = 42\n")
        wheel.writestr("probe_pkg-1.0.dist-info/METADATA",
                       "Metadata-Version: 2.1\nName: probe-pkg\nVersion: 1.0\n")
        wheel.writestr("probe_pkg-1.0.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr("probe_pkg-1.0.dist-info/RECORD", "")
    gpu_check.install_wheels(wheels, tmp_path / "target")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "target")}
    done = subprocess.run([sys.executable, "-c", "import probe_pkg; print(probe_pkg.VALUE)"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "42", done.stderr
    with pytest.raises(SystemExit, match=r"no \.whl files"):
        gpu_check.install_wheels(tmp_path / "target", tmp_path / "elsewhere")


def test_flop_count_matches_torch_flop_counter():
    """The stated FLOP count is 3x the matrix-multiply FLOPs torch counts in one forward."""
    model = build_mae("demo", img_size=64)
    for block in [*model.blocks, *model.decoder_blocks]:
        block.attn.fused_attn = False  # explicit matmuls: the counter does not see the CPU's fused kernel
    grid = 64 // model.patch_size
    masks = MaskGenerator("random", grid=grid, mask_ratio=train_step.MASK_RATIO)
    mask = mask_to_torch(masks(2, epoch=0, index=0))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(2, 3, 64, 64), mask)
    stated = train_step.train_flops_per_image(model.model_args)
    assert stated == pytest.approx(3 * counter.get_total_flops() / 2, rel=0.01)


def test_targets_say_when_a_measurement_misses():
    def part(name: str, rows: list[dict]) -> gpu_check.Part:
        return gpu_check.Part(name, 1, [], gpu_check.read_json_rows, rows=rows)

    slow_train = part("train-step", [
        {"table": "results", "model": "vit_base", "compile": False, "images_per_s": 3000.0},
        {"table": "baseline", "public_style_images_per_s": 2000.0},
    ])  # fmt: skip
    e2e = part("e2e-torch", [{"table": "train.py", "loader": "torch", "data_wait": 0.01}])
    checks = gpu_check.targets({p.name: p for p in (slow_train, e2e)}, smoke=False)
    assert [c["met"] for c in checks] == ["NO", "yes", "yes"]  # 3000 < 4000 img/s; 1.5x >= 1.3x; 1% <= 5%
    smoke = gpu_check.targets({"train-step": slow_train}, smoke=True)
    assert {c["met"] for c in smoke} == {"n/a (smoke)"}


@pytest.mark.gpu
def test_public_style_step_syncs_more_than_ours():
    device = torch.device("cuda")
    model = build_mae("vit_tiny").to(device)
    batch = next(train_step.synthetic_batches(model.model_args, 8, device))
    ours = train_step.host_syncs(train_step.make_step(model, device, torch.bfloat16), batch, device)
    public_model = train_step.PublicStyleMAE(**{k: v for k, v in model.model_args.items() if k != "preset"})
    public_step = train_step.make_step(public_model.to(device), device, torch.bfloat16, public=True)
    assert 1 <= ours < train_step.host_syncs(public_step, batch, device)
