"""Container entry point: run train.py under torchrun on every GPU of this node.

    entrypoint.py [train.py flags ...]     # flags go to train.py unchanged
    entrypoint.py COMMAND [ARGS ...]       # a first argument that is not a flag runs COMMAND instead

One process per visible GPU, or one CPU process when the node has none. Environment:

    NPROC_PER_NODE    processes on this node (default: visible GPUs, 1 without a GPU)
    NNODES            nodes in the job, "N" or an elastic range "MIN:MAX" (default 1)
    RDZV_ENDPOINT     host[:port] of the c10d rendezvous (needed when NNODES is not 1)
    RDZV_ID           job id shared by all nodes (needed when NNODES is not 1)
    MAX_RESTARTS      torchrun worker-group restarts after a failure (default 0)
    SHUTDOWN_TIMEOUT  seconds the workers get to checkpoint after SIGTERM/SIGUSR1 (default 120)
    ENTRYPOINT_DRY_RUN=1   print the command instead of running it

Node ranks are assigned by the c10d rendezvous, so nodes need no NODE_RANK.

Stopping: SIGTERM (`docker stop`) and SIGUSR1 (SLURM's time limit) go straight to the trainers,
which finish their step, save checkpoint-last.pth and exit 0, so torchrun and this process exit 0
too (torchrun itself would pass the signal on but then exit 1). Other signals go to torchrun.

Failing: a trainer's expected failure (a bad config, a batch that does not split over the processes
of an elastic restart, ...) is also written to a file this process names in COLORMAE_ERROR_FILE;
after torchrun's own report (a ChildFailedError traceback, exit 1) this process repeats that
`error: ...` message last and exits with the trainer's code (2: the input, 1: run time).

Elastic jobs (NNODES=MIN:MAX, MAX_RESTARTS >= 1): after a node is lost, torchrun restarts the
trainers on the nodes left, and train.py resumes checkpoint-last.pth on the new number of processes
(the global batch kept; see run_folder.split_batch).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

TRAIN_SCRIPT = str(Path(__file__).resolve().parent.parent / "train.py")
# SIGUSR1 is SLURM's "time is nearly up" signal; torchrun must forward it, not die of it.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# The trainers' own stop signals (train.py saves a checkpoint and exits 0 on them).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
ERROR_FILE = "COLORMAE_ERROR_FILE"  # where the trainers leave their one-line errors (errors.py)


def visible_gpus() -> int:
    """Number of CUDA devices this process can see (honours CUDA_VISIBLE_DEVICES)."""
    import torch

    return torch.cuda.device_count()


def _int_setting(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    text = env.get(name, "").strip() or str(default)
    if not text.isdigit() or int(text) < minimum:
        raise ValueError(f"{name}={text!r}: expected an integer >= {minimum}")
    return int(text)


def _nnodes(env: Mapping[str, str]) -> str:
    text = env.get("NNODES", "").strip() or "1"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", text)
    if not match or int(match[1]) < 1 or (match[2] and int(match[2]) < int(match[1])):
        raise ValueError(f"NNODES={text!r}: expected a node count N >= 1 or a range MIN:MAX")
    return text


def torchrun_command(train_args: Sequence[str], env: Mapping[str, str], gpus: int) -> list[str]:
    """The torchrun command line that runs train.py with `train_args` on this node."""
    nproc = _int_setting(env, "NPROC_PER_NODE", max(gpus, 1))
    nnodes = _nnodes(env)
    command = [
        sys.executable, "-m", "torch.distributed.run",  # torchrun, from this interpreter's environment
        f"--nproc-per-node={nproc}",
        f"--max-restarts={_int_setting(env, 'MAX_RESTARTS', 0, minimum=0)}",
        f"--signals-to-handle={FORWARDED_SIGNALS}",
        f"--shutdown-timeout={_int_setting(env, 'SHUTDOWN_TIMEOUT', 120, minimum=0)}",
    ]
    endpoint, run_id = env.get("RDZV_ENDPOINT", "").strip(), env.get("RDZV_ID", "").strip()
    if nnodes == "1" and not endpoint:  # on loopback: the host name may not resolve (--network none)
        command += ["--standalone", "--local-addr=127.0.0.1"]
    elif not endpoint or not run_id:
        raise ValueError(
            f"NNODES={nnodes} needs RDZV_ENDPOINT (host:port reachable from every node) and RDZV_ID "
            f"(one id shared by the job's nodes); got RDZV_ENDPOINT={endpoint!r} RDZV_ID={run_id!r}"
        )
    else:
        command += [
            f"--nnodes={nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={run_id}",
        ]
    return [*command, TRAIN_SCRIPT, *train_args]


def runs_torchrun(argv: Sequence[str]) -> bool:
    """True when the container arguments are train.py flags (none, or a first one that is a flag)."""
    return not argv or argv[0].startswith("-")


def build_command(argv: Sequence[str], env: Mapping[str, str], gpus: int | None = None) -> list[str]:
    """Command for the container arguments: torchrun + train.py, or `argv` itself when it names a program."""
    if not runs_torchrun(argv):
        return list(argv)
    return torchrun_command(argv, env, visible_gpus() if gpus is None else gpus)


def supervise(command: Sequence[str]) -> int:
    """Run torchrun as a child, passing signals on (see the module notes); returns its exit status, or a
    trainer's code after repeating its `error:` line (see the module notes)."""
    with tempfile.TemporaryDirectory(prefix="colormae-") as folder:
        errors_file = Path(folder) / "errors"
        status = _run_torchrun(command, {**os.environ, ERROR_FILE: str(errors_file)})
        lines = errors_file.read_text().splitlines() if status and errors_file.is_file() else []
    failures = [json.loads(line) for line in lines]
    for message in dict.fromkeys(failure["message"] for failure in failures):
        print(message, file=sys.stderr, flush=True)  # each rank and restart wrote it: each message once
    return failures[0]["code"] if failures else status


def _run_torchrun(command: Sequence[str], env: Mapping[str, str]) -> int:
    launcher = subprocess.Popen(command, process_group=0, env=env)  # a terminal's Ctrl-C reaches it once

    def forward(signum: int, frame: object) -> None:
        try:
            trainers = psutil.Process(launcher.pid).children() if signum in STOP_SIGNALS else []
            for process in trainers or [launcher]:  # before the trainers start, torchrun gets it
                process.send_signal(signum)
        except psutil.NoSuchProcess:  # torchrun or a trainer has just exited
            pass

    for name in FORWARDED_SIGNALS.split(","):
        signal.signal(signal.Signals[name], forward)
    status = launcher.wait()
    return 128 - status if status < 0 else status  # killed by a signal: the shell's convention


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command: torchrun + train.py under supervise(), any other command in this process's place.

    Under ENTRYPOINT_DRY_RUN=1 print the command instead."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        command = build_command(argv, os.environ)
    except ValueError as error:
        sys.exit(f"entrypoint: {error}")
    if os.environ.get("ENTRYPOINT_DRY_RUN") == "1":
        print(shlex.join(command))
    elif runs_torchrun(argv):
        sys.exit(supervise(command))
    else:
        os.execvp(command[0], command)


if __name__ == "__main__":
    main()
