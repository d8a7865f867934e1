"""train.py with a record of what each optimiser step read, for tests/test_elastic.py (run by torchrun
or plain python): `elastic_worker.py RECORD COLOURS STOP_AT PAUSE_AT [train.py arguments]`.

Each step appends a JSON line to RECORD: torchrun's restart count, world size, rank, the step number,
the loss and the ids of the images the step trained on (each test image is one flat colour, listed
in the JSON file COLOURS, which any crop, flip and resize keeps). At step STOP_AT (if > 0) rank 0
sends itself SIGTERM: the run saves a mid-epoch checkpoint and stops. At step PAUSE_AT (if > 0) of a
first attempt with 2 processes, every rank writes RECORD.paused-<rank> and waits for RECORD.go: the
test then kills one node, deterministically in the middle of an epoch.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import train

record = Path(sys.argv[1])
colours = torch.tensor(json.loads(Path(sys.argv[2]).read_text()), dtype=torch.float32)
stop_at, pause_at = int(sys.argv[3]), int(sys.argv[4])
restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
real_step = train.train_step


def image_ids(images: torch.Tensor) -> list[int]:
    """The ids of a batch's flat-colour images: the nearest listed colour of each mean colour."""
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    rgb = (images.float().mean(dim=(2, 3)).cpu() * std + mean) * 255
    return torch.cdist(rgb, colours).argmin(dim=1).tolist()


def recording_step(run, batches):
    if run.step + 1 == pause_at and run.world == 2 and restart == 0:
        Path(f"{record}.paused-{run.rank}").touch()
        while not Path(f"{record}.go").exists():
            time.sleep(0.05)
    ids = []

    def read():
        for batch in batches:
            ids.extend(image_ids(batch["images"]))
            yield batch

    metrics = real_step(run, read())
    entry = {"restart": restart, "world": run.world, "rank": run.rank, "step": run.step, "ids": ids,
             "loss": float(metrics["loss"])}
    with open(record, "a") as f:
        f.write(json.dumps(entry) + "\n")
    if run.step == stop_at and run.rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    return metrics


train.train_step = recording_step
train.main(sys.argv[5:])
