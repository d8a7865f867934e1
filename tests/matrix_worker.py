"""The two-process cells of tests/test_matrix.py in one torchrun launch: `matrix_worker.py CELLS`, a
JSON list of [train.py arguments, [port, port], run folder].

Each cell is trained twice, as a user does after a preemption: rank 0 sends itself SIGTERM during
step 1 (every rank stops after that step and the run saves), then the same command resumes. Each
training has its own process group (a fresh rendezvous store on its own port). After each, rank 0
prints `CELL <run folder> <stopped|done> <checkpoint step> <each rank's loader position>`.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

import train

real_step = train.train_step


def step_then_signal(run: train.Run, batches) -> dict:
    """Step 1 with a SIGTERM to rank 0 on its way: the loop stops after it."""
    train.train_step = real_step
    if run.rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_step(run, batches)


os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"  # rank 0 hosts each training's own store
for argv, ports, run_dir in json.loads(sys.argv[1]):
    for port, state in zip(ports, ("stopped", "done"), strict=True):
        os.environ["MASTER_PORT"] = str(port)
        train.train_step = step_then_signal if state == "stopped" else real_step
        train.main(argv)
        if os.environ["RANK"] == "0":
            ckpt = torch.load(Path(run_dir) / "checkpoint-last.pth", weights_only=True)
            positions = [loader["samples"] for loader in ckpt["loader"]]
            print("CELL", run_dir, state, ckpt["step"], positions, flush=True)
