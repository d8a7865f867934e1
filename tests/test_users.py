"""The README's demo path as a cluster container's user runs it: a uid with no passwd entry, no USER,
HOME=/ (what `docker run --user $(id -u):$(id -g)`, which docker/README.md recommends, gives such a
uid), a runs folder of its own. Train, evaluate, export and compare all succeed; the caches that
would go under HOME go to the temporary folder, said in one line; where that fails too, one line
names the variable to set. Taking another uid needs root: skipped otherwise.
"""

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

import noise
from pipelines import manifest

ROOT = Path(__file__).resolve().parent.parent
UID = 54321
TINY = ("{depth: 1, decoder_depth: 1, embed_dim: 48, num_heads: 2, "
        "decoder_embed_dim: 32, decoder_num_heads: 2}")
TRAIN = [str(ROOT / "train.py"), "--config", "demo.yaml", f"model.args={TINY}", "train.batch_size=8",
         "train.epochs=1", "train.steps_per_epoch=2", "data.workers=0"]
CACHE_NOTE = "set COLORMAE_CACHE to a"


def _cannot_switch_uid() -> str:
    """Why commands cannot run as UID here ("" when they can)."""
    if os.geteuid() != 0:
        return "running commands as another uid needs root"
    if shutil.which("setpriv") is None:
        return "needs util-linux's setpriv"
    try:
        pwd.getpwuid(UID)
    except KeyError:
        return ""
    return f"uid {UID} has a passwd entry on this machine"


as_another_uid = pytest.mark.skipif(bool(_cannot_switch_uid()), reason=_cannot_switch_uid())


def as_uid(args: list[str], cwd: Path, tmp: Path, **env: str) -> subprocess.CompletedProcess:
    """`python ARGS` in `cwd` as UID (group UID, no other group), with HOME=/, no USER or LOGNAME and
    TMPDIR=`tmp`. setpriv keeps CAP_DAC_READ_SEARCH, which lets the uid read the interpreter (under
    root's 0700 home here) and nothing more: it still writes only where the uid may."""
    env = {"PATH": os.environ["PATH"], "HOME": "/", "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", **env}
    setpriv = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups",
               "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", "--"]
    return subprocess.run([*setpriv, sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def folders(random_image_folder) -> Iterator[tuple[Path, Path, Path]]:
    """(data, work, tmp) in a folder every uid can enter (pytest's own is root's alone): tiny train/ and
    val/ class folders; the uid's working folder (the README's commands run there, `runs/` inside)
    and temporary folder, both its own."""
    base = Path(tempfile.mkdtemp(prefix="colormae-test-users-"))
    base.chmod(0o755)
    data, work, tmp = base / "data", base / "work", base / "tmp"
    for split in ("train", "val"):
        random_image_folder(data / split, 8)
    for folder in (work, tmp):
        folder.mkdir()
        os.chown(folder, UID, UID)
    yield data, work, tmp
    shutil.rmtree(base)


@pytest.mark.slow
@as_another_uid
def test_the_demo_path_runs_as_a_uid_without_passwd_entry_or_writable_home(folders):
    data, work, tmp = folders
    checkpoint = ["--checkpoint", "runs/demo/checkpoint-last.pth"]
    probe = ["--data", str(data), "--workers", "0", "--batch-size", "16"]
    commands = {
        "train": [*TRAIN, f"data.path={data}/train"],
        "knn": ["-m", "eval.knn", *checkpoint, *probe],
        "linear": ["-m", "eval.linear_probe", *checkpoint, *probe, "--epochs", "1"],
        "export": ["-m", "model.export", *checkpoint, "--out", "exported/demo"],
        "compare": ["-m", "eval.compare", "--experiment", "colormae-demo", "--out", "runs/compare"],
    }
    for name, args in commands.items():
        done = as_uid(args, work, tmp)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{name}: {output[-3000:]}"
        assert "Traceback" not in output and "Permission denied" not in output, f"{name}: {output}"
        assert "MPLCONFIGDIR" not in output, f"{name}: matplotlib fell back to a throw-away folder"
        if name != "export":  # the commands that cache data manifests, mask banks or fonts say where
            assert done.stderr.count(f"using {tmp}/colormae-{UID} instead; {CACHE_NOTE} lasting") == 1, name

    assert (work / "exported/demo/model.safetensors").is_file() and list((work / "runs/compare").glob("*.md"))
    assert {p.stat().st_uid for p in (work / "runs").rglob("*")} == {UID}
    assert {p.name for p in (tmp / f"colormae-{UID}").iterdir()} >= {"data", "banks", "matplotlib"}

    client = MlflowClient(f"sqlite:///{work}/runs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("colormae-demo").experiment_id])
    assert {run.info.status for run in runs} == {"FINISHED"}
    by_kind = {run.data.tags.get("evaluation", "pretrain"): run for run in runs}
    assert sorted(by_kind) == ["compare", "knn", "linear", "pretrain"] and len(runs) == 4
    assert by_kind["pretrain"].data.tags["mlflow.user"] == str(UID)  # no USER, no name: the uid


@pytest.mark.slow
@as_another_uid
def test_no_writable_cache_folder_is_one_line_naming_the_variable(folders):
    data, work, tmp = folders
    (tmp / f"colormae-{UID}").mkdir()  # root's: not this uid's to use

    done = as_uid([*TRAIN, f"data.path={data}/train"], work, tmp)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: no writable cache folder: /.cache/colormae (HOME=/) and {tmp}/colormae-{UID} cannot be "
        "used; set COLORMAE_CACHE to a writable folder")
    assert not (work / "runs/demo").exists() and not (work / "runs/mlflow.db").exists()

    chosen = tmp / "cache"  # the remedy the line gives
    chosen.mkdir()
    os.chown(chosen, UID, UID)
    done = as_uid([*TRAIN, f"data.path={data}/train"], work, tmp, COLORMAE_CACHE=str(chosen))
    assert done.returncode == 0 and CACHE_NOTE not in done.stderr, done.stderr
    assert (chosen / "data").is_dir() and (work / "runs/demo/checkpoint-last.pth").is_file()


def test_without_home_folder_or_passwd_entry_the_cache_is_in_the_temporary_folder(tmp_path, monkeypatch,
                                                                                   caplog):
    """No HOME and no passwd entry: `~` cannot be expanded; the cache is `<temporary folder>/colormae-<uid>`,
    said once, and no folder named `~` appears in the working folder."""
    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    for variable in ("HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("COLORMAE_CACHE", "")  # unset, and restored after the fallback sets it
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)

    roots = {manifest.cache_root(), noise.default_cache_dir().parent}
    assert roots == {tmp_path / f"colormae-{os.getuid()}"}
    assert caplog.text.count("set COLORMAE_CACHE to a lasting writable folder") == 1
    assert not (tmp_path / "~").exists()
