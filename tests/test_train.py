"""train.py end to end on CPU with a tiny demo model and a synthetic image folder.

Covered: checkpoints and MLflow (SQLite) of a full run, the optimiser and schedule, exact resume
after SIGTERM, a non-finite loss, two torchrun processes (gloo), and a real `mlflow server`
killed in the middle of a run.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import cli
import noise.stats
import tracking
import train
from configs import load_config, to_dict
from configs.fingerprint import fingerprint
from model import MaskedAutoencoderViT, build_mae, load_mae
from pipelines import scan
from tracking.store import artifact_repository

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.args={depth: 1, decoder_depth: 1}", "train.batch_size=8", "data.workers=0",
        "train.warmup_epochs=1", "log.every_steps=1"]
pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (tests/conftest.py)
CONTRACT_KEYS = {"model", "model_args", "optimizer", "scaler", "epoch", "step", "loader", "rng", "config",
                 "data_signature", "mlflow_run_id", "micro_batch"}


@pytest.fixture(scope="module")
def images(tmp_path_factory, random_image_folder) -> Path:
    """48 random 32x32 PNGs in two class folders: 6 batches of 8 per epoch."""
    return random_image_folder(tmp_path_factory.mktemp("images") / "train", 24)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One runs root (one SQLite store, whose set-up takes seconds) for the in-process runs."""
    return tmp_path_factory.mktemp("runs")


def args(images: Path, runs: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "demo.yaml"), f"data.path={images}", f"log.runs_root={runs}",
            *TINY, *extra]


def mlflow_client(uri: str):
    """An MLflow client, imported here: this module's GPU test needs no mlflow (bare GPU images lack it)."""
    from mlflow import MlflowClient

    return MlflowClient(uri)


def mlflow_run(runs: Path, run_dir: Path):
    client = mlflow_client(tracking.default_tracking_uri(runs))
    run_id = torch.load(run_dir / "checkpoint-last.pth", weights_only=True)["mlflow_run_id"]
    return client, client.get_run(run_id)


def test_full_run_writes_checkpoints_and_mlflow(images, runs):
    model = train.main(args(images, runs, "train.epochs=2", "log.run_name=full"))
    run_dir = runs / "full"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*.pth")) == [
        "checkpoint-1.pth", "checkpoint-2.pth", "checkpoint-last.pth"]
    ckpt = torch.load(run_dir / "checkpoint-last.pth", weights_only=True)
    assert set(ckpt) == CONTRACT_KEYS
    assert (ckpt["epoch"], ckpt["step"], len(ckpt["loader"])) == (2, 12, 1)
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt["model"][name], tensor), name
    assert isinstance(load_mae(ckpt), MaskedAutoencoderViT)  # strict load through the model package

    client, run = mlflow_run(runs, run_dir)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["mask.schedule"] == "green"
    tags = run.data.tags
    assert [tags[k] for k in ("loader", "mask", "world_size", "device")] == ["torch", "green", "1", "cpu"]
    assert tags["checkpoint"] == "full/checkpoint-last.pth"  # relative to the runs root
    assert tags["mlflow.source.name"] == "train.py" and tags["mlflow.source.type"] == "LOCAL"  # no local path
    assert tags["mlflow.user"] and tags["mlflow.source.git.commit"] == tracking.git_commit()
    cfg = train.parse_args(args(images, runs, "train.epochs=2", "log.run_name=full"))[0]
    assert tags["colormae.fingerprint"] == fingerprint(cfg, scan(images).signature(), steps_per_epoch=6)[0]
    assert {"loss", "lr", "images_per_s", "data_wait", "step_time_s", "peak_mem_mb"} <= set(run.data.metrics)
    mask_stats = {name: value for name, value in run.data.params.items() if name.startswith("mask_stats.")}
    assert set(mask_stats) == {f"mask_stats.green.{name}" for name in noise.stats.STATISTICS}
    assert 0.5 < float(mask_stats["mask_stats.green.neighbour_agreement"]) < 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 13))
    repository = artifact_repository(tracking.default_tracking_uri(runs), run.info.artifact_uri)
    artifacts = {a.path for folder in ("figures", "reconstructions", "environment")
                 for a in repository.list_artifacts(folder)}
    assert artifacts == {"figures/masks.png", "reconstructions/reconstruction-epoch-0001.png",
                         "reconstructions/reconstruction-epoch-0002.png", "environment/environment.json",
                         "environment/pip-freeze.txt"}
    figure = Image.open(run_dir / "reconstruction-epoch-0002.png")
    assert figure.height == 4 * (4 * 32 + 2) + 2 and figure.width > 8 * (4 * 32 + 2)  # 4 labelled rows of 8
    env = Path(repository.download_artifacts("environment/environment.json", str(run_dir)))
    env = json.loads(env.read_text())
    assert env["torch"] == torch.__version__ and "ffcv" in env["loader_libraries"]

    config = repository.download_artifacts("config.yaml", str(run_dir))  # reruns as is
    assert to_dict(load_config(config)) | {"name": ""} == to_dict(train.parse_args(
        args(images, runs, "train.epochs=2", "log.run_name=full"))[0]) | {"name": ""}
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.digest == scan(images).signature()
    assert json.loads(dataset.dataset.profile) == {"num_images": 48}
    [encoder] = client.search_logged_models([run.info.experiment_id],
                                            filter_string=f"source_run_id = '{run.info.run_id}'")
    mlflow_model = tracking.download_artifacts(tracking.default_tracking_uri(runs), encoder.artifact_location,
                                               run_dir / "encoder")
    import mlflow.pyfunc

    assert mlflow.pyfunc.load_model(str(mlflow_model)).metadata.metadata["input_size"] == [3, 32, 32]
    exported = mlflow_model / "artifacts" / "encoder"  # the timm folder inside the MLflow model
    card = json.loads((exported / "model-card.json").read_text())
    assert (card["steps"], card["images_seen"], card["pretraining_run_id"]) == (12, 96, run.info.run_id)
    assert card["fingerprint"] == tags["colormae.fingerprint"]
    assert card["final_loss"] == client.get_metric_history(run.info.run_id, "loss")[-1].value
    vit = timm.create_model(f"local-dir:{exported}", pretrained=True)
    for name, tensor in vit.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name

    lrs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "lr"), key=lambda m: m.step)]
    peak = load_config(ROOT / "configs" / "demo.yaml", ["train.batch_size=8"]).lr
    assert lrs[0] == 0.0 and lrs[:7] == sorted(lrs[:7])  # linear warm-up over the first epoch (6 steps)
    assert lrs[6] == pytest.approx(peak) and lrs[6:] == sorted(lrs[6:], reverse=True)  # then cosine


def test_weight_decay_skips_biases_norms_and_tokens(images, tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.path={images}", f"log.runs_root={tmp_path}",
                                                      *TINY, "log.mlflow=false"])
    run = train.build(cfg)
    names = {id(p): n for n, p in run.model.named_parameters()}
    decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in run.optimizer.param_groups}
    assert {"cls_token", "mask_token", "norm.weight", "norm.bias", "blocks.0.attn.qkv.bias"} <= decay[0.0]
    assert all(n.endswith("weight") and "norm" not in n for n in decay[0.05])
    assert {"pos_embed", "decoder_pos_embed"}.isdisjoint(decay[0.0] | decay[0.05])  # fixed, not trained
    assert run.optimizer.defaults["betas"] == (0.9, 0.95)


def test_gradient_accumulation_matches_one_big_batch(images, tmp_path):
    """Two micro-batches of 4 accumulate the gradient of one batch of 8 (loss scaled by 1/accum_steps)."""
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(8, 3, 32, 32, generator=gen)
    mask = torch.rand(8, 64, generator=gen).argsort(dim=1) >= 16  # 16 visible patches per image
    results = []
    for accum in (1, 2):
        cfg = load_config(ROOT / "configs" / "demo.yaml", [
            f"data.path={images}", f"log.runs_root={tmp_path / str(accum)}", *TINY, "log.mlflow=false",
            "train.warmup_epochs=0", f"train.accum_steps={accum}"])
        run = train.build(cfg)
        run.optimizer.zero_grad = lambda set_to_none=True: None  # keep the gradients to compare
        micro = 8 // accum
        batches = iter([{"images": imgs[i:i + micro], "mask": mask[i:i + micro]} for i in range(0, 8, micro)])
        loss = train.train_step(run, batches)["loss"].item()  # left on the device by the step
        grads = {n: p.grad for n, p in run.model.named_parameters() if p.grad is not None}
        results.append((loss, grads, run.step))
    (loss1, grads1, step1), (loss2, grads2, step2) = results
    assert loss2 == pytest.approx(loss1, rel=1e-5) and step1 == step2 == 1
    assert grads1.keys() == grads2.keys() and len(grads1) > 10
    for name, grad in grads1.items():
        torch.testing.assert_close(grads2[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_command_line_flags_and_overrides_mix():
    cfg, cli = train.parse_args(["--config", str(ROOT / "configs" / "demo.yaml"), "train.epochs=5",
                                 "--loader", "dali", "mask.schedule=blue", "--mlflow-uri", "http://h:5000",
                                 "--resume", "runs/demo"])
    assert (cfg.train.epochs, cfg.mask.schedule, cfg.data.loader) == (5, "blue", "dali")
    assert cfg.log.mlflow_uri == "http://h:5000" and cli.resume == "runs/demo"


def test_no_metric_is_lost_to_the_logging_interval(images, runs, monkeypatch):
    """2 epochs x 3 steps with log.every_steps=10: every epoch end logs its window, SIGTERM its own."""
    steps = ("train.epochs=2", "train.steps_per_epoch=3", "log.every_steps=10")
    train.main(args(images, runs, *steps, "log.run_name=window"))
    client, run = mlflow_run(runs, runs / "window")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [3, 6]

    signal_during_step(monkeypatch, 5)  # mid-epoch 2
    train.main(args(images, runs, *steps, "log.run_name=window-term"))
    client, run = mlflow_run(runs, runs / "window-term")
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [3, 5]


def test_mlflow_off_creates_no_store_and_never_imports_mlflow(images, tmp_path):
    argv = args(images, tmp_path, "train.epochs=1", "train.steps_per_epoch=1", "log.mlflow=false")
    code = f"import sys, train\ntrain.main({argv!r})\nprint('mlflow imported:', 'mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "mlflow imported: False" in out.stdout and "mlflow ui" not in out.stdout + out.stderr
    assert (tmp_path / "demo" / "checkpoint-last.pth").is_file() and not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "demo" / tracking.OFFLINE_FILE).exists()


def signal_during_step(monkeypatch, step: int) -> None:
    """Make the next run get SIGTERM during optimiser step `step`: it finishes the step, saves, returns."""
    real_step = train.train_step

    def step_then_signal(run, batches):
        if run.step == step - 1:
            monkeypatch.setattr(train, "train_step", real_step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(run, batches)

    monkeypatch.setattr(train, "train_step", step_then_signal)


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_resume_after_sigterm_is_exact(images, runs, monkeypatch, loader):
    """18 steps straight versus 9 steps, SIGTERM, resume, 9 more, with a new mask colour every epoch:
    identical losses and weights."""
    options = ["train.epochs=3", f"data.loader={loader}", "mask.schedule=green@0,blue@1,random@2"]
    straight = train.main(args(images, runs, *options, f"log.run_name=straight-{loader}"))

    signal_during_step(monkeypatch, 9)
    train.main(args(images, runs, *options, f"log.run_name=split-{loader}"))
    ckpt = torch.load(runs / f"split-{loader}" / "checkpoint-last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["loader"][0]["samples"]) == (1, 9, 3 * 8)  # mid-epoch
    assert mlflow_run(runs, runs / f"split-{loader}")[1].info.status == "KILLED"
    resumed = train.main(args(images, runs, *options, f"log.run_name=split-{loader}"))

    histories = []
    for name in (f"straight-{loader}", f"split-{loader}"):
        client, run = mlflow_run(runs, runs / name)
        history = client.get_metric_history(run.info.run_id, "loss")
        histories.append(sorted((m.step, m.value) for m in history))
    assert [step for step, _ in histories[1]] == list(range(1, 19))  # one MLflow run across the restart
    assert histories[1] == histories[0]
    for name, tensor in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def record_batches(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """From now on, every batch a training step takes is recorded as (mask, per-image mean colour)."""
    seen = []
    real_step = train.train_step

    def recording_step(run, batches):
        batch = next(batches)  # one micro-batch per step in these tests
        seen.append((batch["mask"].clone(), batch["images"].mean(dim=(2, 3))))
        return real_step(run, itertools.chain([batch], batches))

    monkeypatch.setattr(train, "train_step", recording_step)
    return seen


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba's finalizer at gc
def test_ffcv_resume_keeps_masks_and_sample_order(tmp_path, monkeypatch):
    """ffcv draws its crops unseeded, so only the masks and the sample order can match: each image is
    one flat colour, which any crop keeps, so a batch's mean colours name its samples."""
    folder = tmp_path / "flat"
    for index in range(16):
        (folder / f"c{index % 2}").mkdir(parents=True, exist_ok=True)
        colour = (16 * index, 255 - 16 * index, (64 + 48 * index) % 256)
        Image.new("RGB", (32, 32), colour).save(folder / f"c{index % 2}" / f"{index}.png")
    options = ["train.epochs=2", "train.batch_size=4", "data.loader=ffcv", "mask.schedule=green@0,blue@1",
               "log.mlflow=false"]
    split = record_batches(monkeypatch)
    train.main(args(folder, tmp_path / "runs", *options, "log.run_name=straight"))
    straight = split.copy()
    split.clear()
    signal_during_step(monkeypatch, 6)  # epoch 1 of 2 x 4 steps
    train.main(args(folder, tmp_path / "runs", *options, "log.run_name=split"))
    assert len(split) == 6
    train.main(args(folder, tmp_path / "runs", *options, "log.run_name=split"))

    assert len(split) == len(straight) == 8
    for step, ((mask, colours), (mask_again, colours_again)) in enumerate(zip(straight, split, strict=True)):
        assert torch.equal(mask, mask_again), step
        torch.testing.assert_close(colours, colours_again, rtol=0, atol=0.05, msg=f"step {step}")
    assert not torch.equal(straight[0][0], straight[4][0])  # epochs differ (green, then blue)
    gc.collect()  # ffcv's compiled pipelines are finalised here, under this test's warning filter


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(images, runs, monkeypatch):
    train.main(args(images, runs, "train.epochs=1", "log.run_name=nan"))
    last = runs / "nan" / "checkpoint-last.pth"
    digest = hashlib.sha256(last.read_bytes()).hexdigest()

    real_loss = MaskedAutoencoderViT.forward_loss
    calls = []

    def loss_turns_nan(self, imgs, pred, mask):
        calls.append(1)
        loss = real_loss(self, imgs, pred, mask)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", loss_turns_nan)
    with pytest.raises(SystemExit, match="loss is nan at step 9") as err:
        train.main(args(images, runs, "train.epochs=2", "log.run_name=nan"))
    assert f"last good checkpoint {last} is kept" in str(err.value)
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest
    assert mlflow_run(runs, runs / "nan")[1].info.status == "FAILED"


def test_failure_before_the_first_step_ends_the_mlflow_run_as_failed(images, runs, monkeypatch):
    def figure_fails(self):
        raise OSError("disk full")

    monkeypatch.setattr(train.Report, "log_mask_figure", figure_fails)
    with pytest.raises(OSError, match="disk full"):
        train.main(args(images, runs, "train.epochs=1", "log.run_name=early"))
    client = mlflow_client(tracking.default_tracking_uri(runs))
    experiments = [e.experiment_id for e in client.search_experiments()]
    [run] = client.search_runs(experiments, filter_string="attributes.run_name = 'early'")
    assert run.info.status == "FAILED"


def test_config_error_exits_before_any_compute(images, tmp_path):
    with pytest.raises(SystemExit, match=r"mask\.ratio 1\.5 must lie strictly between 0 and 1"):
        train.main(args(images, tmp_path, "mask.ratio=1.5"))
    assert not (tmp_path / "demo").exists()


def test_torchrun_two_processes_end_with_identical_weights(images, tmp_path):
    script = tmp_path / "rank_weights.py"
    script.write_text(
        "import os, sys, torch\n"
        "import train\n"
        "model = train.main(sys.argv[1:])\n"
        f"out = os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'] + '.pt')\n"
        "torch.save(model.state_dict(), out)\n")
    argv = args(images, tmp_path, "train.epochs=2", "train.steps_per_epoch=2", "log.mlflow=false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script), *argv]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    torch.manual_seed(0)  # the seed of rank 0, whose weights DDP broadcasts at the start
    initial = train.build_mae("demo", img_size=32, depth=1, decoder_depth=1).state_dict()
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0)  # trained, not just initialised
    for name, tensor in rank0.items():
        assert torch.equal(rank1[name], tensor), name
    ckpt = torch.load(tmp_path / "demo" / "checkpoint-last.pth", weights_only=True)
    assert ckpt["step"] == 4 and len(ckpt["loader"]) == 2
    assert all(torch.equal(ckpt["model"][name], tensor) for name, tensor in rank0.items())


def run_train(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, env=env, text=True,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE)


def wait_for_step(proc: subprocess.Popen, step: int) -> str:
    """Read the plain log lines (no terminal: no progress bar) until `step` is reported; returns them."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if f" step {step} (" in line:
            return "".join(lines)
    pytest.fail(f"training ended before step {step}:\n" + "".join(lines))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(store: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port over a SQLite store; returns once /health answers."""
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
           "--artifacts-destination", str(store / "artifacts")]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # its own process group: killed with its workers
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    pytest.fail("mlflow server did not start within 120 s")


@pytest.mark.slow
def test_mlflow_server_killed_mid_run_loses_nothing(images, tmp_path):
    port, store = free_port(), tmp_path / "server"
    uri = f"http://127.0.0.1:{port}"
    server = start_server(store, port)
    try:
        proc = run_train(args(images, tmp_path, "train.epochs=3", "--mlflow-uri", uri))
        assert "unreachable" not in wait_for_step(proc, 3)  # steps 1-3 reached the server
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        log = proc.communicate()[1]
        assert proc.returncode == 0, log
        assert log.count("is unreachable") == 1, log
        assert cli.command("colormae-tracking", "sync", str((tmp_path / "demo").resolve())) in log
        server = start_server(store, port)
        sync = subprocess.run([sys.executable, "-m", "tracking", "sync", str(tmp_path / "demo")], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert sync.returncode == 0, sync.stderr
        client = mlflow_client(uri)
        run_id = torch.load(tmp_path / "demo" / "checkpoint-last.pth", weights_only=True)["mlflow_run_id"]
        assert run_id and run_id in sync.stdout
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert sorted({m.step for m in client.get_metric_history(run_id, "loss")}) == list(range(1, 19))
        recon = {a.path for a in client.list_artifacts(run_id, "reconstructions")}
        assert recon == {f"reconstructions/reconstruction-epoch-000{e}.png" for e in (1, 2, 3)}
        [encoder] = client.search_logged_models([run.info.experiment_id],  # logged offline, synced as such
                                                filter_string=f"source_run_id = '{run_id}'")
        files = {a.path for a in client.list_logged_model_artifacts(encoder.model_id, "artifacts/encoder")}
        assert encoder.name == "encoder" and encoder.params["preset"] == "demo"  # an MLflow model around
        assert files == {f"artifacts/encoder/{name}" for name in ("config.json", "model.safetensors",
                                                                  "model-card.json", "README.md")}
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_gpu_run_in_mixed_precision_resumes(images, tmp_path, precision):
    """The CUDA twin of the CPU runs: bf16 autocast (auto) or fp16 with a grad scaler, then resume."""
    argv = args(images, tmp_path, "train.device=cuda", f"train.precision={precision}", "log.mlflow=false")
    train.main([*argv, "train.epochs=1"])
    model = train.main([*argv, "train.epochs=2"])
    ckpt = torch.load(tmp_path / "demo" / "checkpoint-last.pth", weights_only=True)
    assert ckpt["step"] == 12 and ckpt["rng"][0]["cuda"] is not None
    assert next(model.parameters()).is_cuda
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert bool(ckpt["scaler"]) == (precision == "fp16")  # the scaler state exists only for fp16


def test_reconstruction_figure_of_a_perfect_prediction_is_grey(tmp_path):
    """Greyscale inputs predicted exactly (per-patch-normalised targets) come back exactly grey:
    the figure's denormalisation adds no colour cast; labels, padding and hidden patches are grey too."""
    mae = build_mae("demo", depth=1, decoder_depth=1, img_size=32)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    images = (torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)).expand(4, 3, 32, 32)
              - mean) / std

    def oracle(imgs, mask, ratio=0.75):
        target = mae.patchify(imgs)
        normalised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return torch.zeros(()), normalised, torch.rand(len(imgs), target.shape[1]).lt(0.75).float()

    mae.forward = oracle
    train.reconstruction_grid(mae, images, None, tmp_path / "figure.png")
    pixels = torch.from_numpy(np.array(Image.open(tmp_path / "figure.png").convert("RGB"))).int()
    assert pixels.shape[0] == 4 * (4 * 32 + 2) + 2  # four rows of 32-pixel images scaled x4
    for channel in (1, 2):  # green and blue equal red everywhere
        assert (pixels[..., channel] - pixels[..., 0]).abs().max() <= 1


def test_git_commit_tag_from_env_or_unknown_without_git(monkeypatch):
    monkeypatch.setenv("GIT_COMMIT", "abc123")
    assert tracking.git_commit() == "abc123"
    monkeypatch.delenv("GIT_COMMIT")
    assert len(tracking.git_commit()) == 40  # this checkout's commit
    monkeypatch.setenv("PATH", "/nonexistent")  # an image without git
    assert tracking.git_commit() == "unknown"
