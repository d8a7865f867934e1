"""docker/ without a Docker engine: hadolint, the compose file, shell lint, the entrypoint's commands."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
VENV_BIN = Path(sys.executable).parent


def load(name: str):
    """A docker/ script as a module (`import docker` is the Docker SDK that mlflow depends on)."""
    spec = importlib.util.spec_from_file_location(name, DOCKER / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


entrypoint_module = load("entrypoint")
TRAIN_SCRIPT, build_command = entrypoint_module.TRAIN_SCRIPT, entrypoint_module.build_command


def tool(name: str) -> str:
    """A lint tool from the .venv (installed from requirements-dev.txt)."""
    path = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail(f"{name} is missing: run `bash scripts/setup.sh` (requirements-dev.txt installs it)")
    return path


def run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)


# ---- the image -------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint():
    result = run(tool("hadolint"), "--no-color", str(DOCKER / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    result = run(tool("hadolint"), "--no-color", str(bad))
    assert result.returncode != 0 and "DL3006" in result.stdout


def test_dependencies_are_installed_before_the_code_is_copied():
    lines = [line.strip() for line in (DOCKER / "Dockerfile").read_text().splitlines()]
    requirements = next(i for i, line in enumerate(lines) if "-r /tmp/requirements-loaders.txt" in line)
    code = lines.index("COPY . /app")
    assert lines.index("COPY requirements.txt requirements-loaders.txt /tmp/") < requirements < code
    assert "USER 1000:1000" in lines[code:]


def stages() -> dict[str, str]:
    """The Dockerfile's stages by name: the text from each `FROM ... AS name` to the next."""
    parts = re.split(r"^FROM \S+ AS (\w+)$", (DOCKER / "Dockerfile").read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_compilers_and_headers_stay_in_the_builder_stage():
    found = stages()
    assert list(found)[-1] == "trainer" and "builder" in found
    assert "build-essential" in found["builder"] and "libopencv-dev" in found["builder"]
    for name in ("python", "mlflow", "trainer"):
        installs = " ".join(re.findall(r"--no-install-recommends \\\n(.*?)\\\n", found[name], re.S))
        assert not re.search(r"build-essential|gcc|g\+\+|clang|-dev\b", installs), f"{name}: {installs}"
    assert "from=builder" in found["trainer"]  # ffcv comes as the builder's wheel


def test_both_images_carry_the_oci_labels_and_the_server_a_healthcheck():
    found = stages()
    for name in ("mlflow", "trainer"):
        for label in ("source", "revision", "version", "created"):
            assert f"org.opencontainers.image.{label}=$" in found[name], f"{name}: no {label} label"
    assert "HEALTHCHECK" in found["mlflow"]


def test_dockerignore_keeps_data_runs_and_environments_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "runs", "mlruns", "docker/.env"} <= ignored


@pytest.mark.slow
def test_environment_check_runs_each_stack_on_the_cpu(capsys):
    check_env = load("check_env")
    check_env.main([])
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["torch"] == "2.14.1" and report["versions"]["ffcv"] == "1.0.2"
    if not report["gpu"]:
        assert report["dali"] == "decode on the CPU" and report["cupy"].startswith("imported; no GPU")
        with pytest.raises(SystemExit, match="no CUDA device visible"):
            check_env.main(["--require-gpu"])


@pytest.mark.gpu
def test_environment_check_runs_each_stack_on_the_gpu(capsys):
    for stack in ("cupy", "nvidia.dali", "ffcv"):  # a bare GPU image may lack them: a skip names the one
        pytest.importorskip(stack)
    load("check_env").main(["--require-gpu"])
    report = json.loads(capsys.readouterr().out)
    assert report["dali"] == "nvjpeg decode on the GPU" and report["cupy"].startswith("runtime")


# ---- the compose stack -----------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def check_compose(path: Path) -> subprocess.CompletedProcess:
    """check-jsonschema with the compose-spec schema it vendors (no download)."""
    return run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path))


def test_compose_file_matches_the_compose_schema():
    result = check_compose(DOCKER / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_rejects_a_broken_file(tmp_path):
    broken = compose()
    broken["services"]["mlflow"]["healthcheck"]["retries"] = "many"
    broken["services"]["trainer"]["deploy"]["resources"]["reservations"]["gpus"] = "all"
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert check_compose(path).returncode != 0


def test_every_service_restarts_and_the_servers_have_health_checks():
    services = compose()["services"]
    assert all(service.get("restart") for service in services.values())
    assert {"test", "interval"} <= services["postgres"]["healthcheck"].keys()
    assert {"test", "interval"} <= services["mlflow"]["healthcheck"].keys()
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_published_ports_bind_to_localhost_by_default():
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            host = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(port)).split(":")[0]
            assert host == "127.0.0.1", f"{name} publishes {port}"


def test_state_lives_in_named_volumes():
    config = compose()
    declared = set(config["volumes"])
    for name in ("postgres", "mlflow"):
        mounts = [volume.split(":")[0] for volume in config["services"][name]["volumes"]]
        assert mounts and set(mounts) <= declared, f"{name} mounts {mounts}"


def test_trainer_reserves_gpus_and_logs_to_the_server():
    trainer = compose()["services"]["trainer"]
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert trainer["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "/data:ro" in " ".join(trainer["volumes"])


def test_secrets_come_from_the_env_file_and_the_example_names_them_all():
    text = (DOCKER / "compose.yaml").read_text()
    assert not re.search(r"PASSWORD: (?!\$\{)", text), "a password is written into compose.yaml"
    used = set(re.findall(r"\$\{(\w+)", text))
    example = (DOCKER / ".env.example").read_text()
    documented = set(re.findall(r"^(\w+)=", example, flags=re.MULTILINE)) - {"COMPOSE_PROJECT_NAME"}
    assert used == documented
    assert re.search(r"^POSTGRES_PASSWORD=$", example, flags=re.MULTILINE), "the example holds a password"
    ignored = run("git", "check-ignore", "-q", "docker/.env", cwd=ROOT)
    assert ignored.returncode == 0, "docker/.env is not git-ignored"


def compose_command() -> list[str] | None:
    """`docker compose` (the plugin), else Debian's docker-compose, else None."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return [shutil.which("docker-compose")] if shutil.which("docker-compose") else None


def test_compose_itself_accepts_the_stack():
    """The file as compose reads it (no engine needed): variables resolve, the password is required."""
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    compose = [*command, "--env-file", str(ROOT / "docker" / ".env.example"), "-f",
               str(ROOT / "docker" / "compose.yaml"), "config"]
    result = subprocess.run(compose, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "POSTGRES_PASSWORD": "example-7f3a"})
    assert result.returncode == 0, result.stderr
    assert set(yaml.safe_load(result.stdout)["services"]) >= {"postgres", "mlflow"}
    without_password = {key: value for key, value in os.environ.items() if key != "POSTGRES_PASSWORD"}
    unset = subprocess.run(compose, capture_output=True, text=True, timeout=120, env=without_password)
    assert unset.returncode != 0 and "POSTGRES_PASSWORD" in unset.stderr


# ---- shell scripts ---------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["mlflow-server.sh", "slurm/train.sbatch"])
def test_shell_scripts_pass_shellcheck(script):
    result = run(tool("shellcheck"), str(DOCKER / script))
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(("env", "message"), [
    ({}, "MLFLOW_BACKEND_STORE_URI"),
    ({"MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://x", "MLFLOW_AUTH": "yes"}, "expected true or false"),
    ({"MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://x", "MLFLOW_AUTH": "true"},
     "MLFLOW_AUTH_ADMIN_PASSWORD"),
])
def test_mlflow_server_script_names_a_missing_or_bad_setting(tmp_path, env, message):
    env = {"PATH": os.environ["PATH"], "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "a"), **env}
    result = run("sh", str(DOCKER / "mlflow-server.sh"), env=env)
    assert result.returncode != 0 and message in result.stderr


FAKE_SRUN = """#!/bin/bash
# Stands in for srun: a trainer that checkpoints on USR1, and records how it was called.
trap 'echo checkpointed > "$RECORD/trainer"; exit 0' USR1
echo "$NNODES $RDZV_ENDPOINT $RDZV_ID $*" > "$RECORD/srun"
while true; do sleep 0.1; done
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in
  show) printf 'node007\\nnode008\\n'; seq -f 'node%04g' 9 3000 ;;  # a big job's long list
  requeue) echo "$2" > "$RECORD/requeued" ;;
esac
"""


def test_slurm_script_checkpoints_and_requeues_on_usr1(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RECORD": str(tmp_path),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[007-008]"}
    script = DOCKER / "slurm" / "train.sbatch"
    job = subprocess.Popen(["bash", str(script), "--config", "c.yaml", "train.epochs=9"], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    job.send_signal(signal.SIGUSR1)
    output = job.communicate(timeout=30)[0]
    assert job.returncode == 0, output
    assert (tmp_path / "srun").read_text().split() == [
        "2", "node007:29500", "4242", "--kill-on-bad-exit=1", ".venv/bin/python", "docker/entrypoint.py",
        "--config", "c.yaml", "train.epochs=9"]
    assert (tmp_path / "trainer").read_text().strip() == "checkpointed"
    assert (tmp_path / "requeued").read_text().strip() == "4242"


# ---- the entrypoint --------------------------------------------------------------------------

def flag(command: list[str], name: str) -> str | None:
    """Value of torchrun's --name=value in `command` (None when absent)."""
    return next((arg.split("=", 1)[1] for arg in command if arg.startswith(f"--{name}=")), None)


def test_one_process_per_gpu_and_flags_pass_through_unchanged():
    args = ["--config", "configs/demo.yaml", "train.epochs=2", "--mlflow-uri", "http://mlflow:5000"]
    command = build_command(args, {}, gpus=4)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--standalone" in command
    assert flag(command, "nproc-per-node") == "4"
    assert command[command.index(TRAIN_SCRIPT) + 1:] == args
    assert "SIGUSR1" in flag(command, "signals-to-handle").split(",")


def test_no_gpu_falls_back_to_one_cpu_process():
    assert flag(build_command([], {}, gpus=0), "nproc-per-node") == "1"


def test_nproc_per_node_overrides_the_gpu_count():
    assert flag(build_command([], {"NPROC_PER_NODE": "2"}, gpus=8), "nproc-per-node") == "2"


def test_multi_node_uses_c10d_rendezvous():
    env = {"NNODES": "4", "RDZV_ENDPOINT": "node001:29500", "RDZV_ID": "job42", "MAX_RESTARTS": "3"}
    command = build_command(["--config", "x.yaml"], env, gpus=8)
    assert "--standalone" not in command
    assert (flag(command, "nnodes"), flag(command, "rdzv-backend")) == ("4", "c10d")
    assert (flag(command, "rdzv-endpoint"), flag(command, "rdzv-id")) == ("node001:29500", "job42")
    assert (flag(command, "nproc-per-node"), flag(command, "max-restarts")) == ("8", "3")
    assert flag(build_command([], {**env, "NNODES": "2:4"}, gpus=8), "nnodes") == "2:4"


@pytest.mark.parametrize(("env", "message"), [
    ({"NNODES": "2"}, "RDZV_ENDPOINT"),
    ({"NNODES": "2", "RDZV_ENDPOINT": "node001:29500"}, "RDZV_ID"),
    ({"NNODES": "0"}, "NNODES='0'"),
    ({"NNODES": "4:2"}, "MIN:MAX"),
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE='two'"),
    ({"SHUTDOWN_TIMEOUT": "-5"}, "SHUTDOWN_TIMEOUT"),
])
def test_bad_launch_settings_are_named(env, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_command([], env, gpus=1)


def test_a_command_instead_of_flags_runs_as_given():
    assert build_command(["python", "-m", "eval.knn", "--help"], {}, gpus=8) == [
        "python", "-m", "eval.knn", "--help"]


def entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ENTRYPOINT_DRY_RUN": "1", **env}
    return run(sys.executable, str(DOCKER / "entrypoint.py"), *args, env=environ)


def test_dry_run_finds_no_gpu_here_and_prints_one_cpu_process():
    result = entrypoint("--config", "configs/demo.yaml", "train.epochs=1")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"{sys.executable} -m torch.distributed.run --nproc-per-node=1 ")
    assert " --standalone --local-addr=127.0.0.1 " in line
    assert line.endswith(f"{TRAIN_SCRIPT} --config configs/demo.yaml train.epochs=1")


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_reaches_the_trainer_which_saves_and_exits_0(tmp_path, random_image_folder, stop):
    """`docker stop` (SIGTERM) and SLURM's SIGUSR1, sent to the entrypoint: saved, exit status 0."""
    data = random_image_folder(tmp_path / "images", 4)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    training = subprocess.Popen(
        [sys.executable, str(DOCKER / "entrypoint.py"), "--config", "configs/demo.yaml", f"data.path={data}",
         "data.workers=0", "train.epochs=100", "train.batch_size=4", "train.steps_per_epoch=2",
         "log.every_steps=1", "log.mlflow=false", f"log.runs_root={tmp_path}", "log.run_name=run"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in training.stdout:
        output.append(line)
        if re.search(r"step \d+ \(epoch", line):  # training runs: preempt it
            training.send_signal(stop)
            break
    output += training.stdout.readlines()
    training.wait(timeout=60)
    log = "".join(output)
    assert training.returncode == 0 and "stop signal: saved" in log, log[-3000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=True)
    assert 1 <= checkpoint["step"] < 200


def test_a_bad_setting_exits_with_its_name(monkeypatch):
    monkeypatch.setenv("NNODES", "3")
    with pytest.raises(SystemExit, match="entrypoint: NNODES=3 needs RDZV_ENDPOINT"):
        entrypoint_module.main(["--config", "x.yaml"])
