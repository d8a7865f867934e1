"""A pretraining run's fingerprint: what must match for two runs to be compared as seeds of one setting;
and what a run may change when it resumes.

    digest, keys = fingerprint(cfg, loader.data_signature, steps_per_epoch=trainer.steps_per_epoch)

The digest hashes the resolved config without the settings a comparison varies on purpose (the
seed and the mask) or that do not change the model (logging, the run's name), plus the data's
manifest signature and the number of optimiser steps per epoch the run really took.

A run folder holds one experiment: a resumed run may change only the keys that extend or observe
it (`is_resumable`); run_folder.py refuses any other change.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from configs.config import Config, flatten

# Config keys (or dotted prefixes) outside the fingerprint.
EXCLUDED = ("train.seed", "mask.", "log.", "name")
DATA_SIGNATURE = "data.signature"
STEPS_PER_EPOCH = "steps_per_epoch"  # the name train.py logs the steps actually used under
WORLD_SIZE = "world_size"  # the number of processes, compared on resume like a config key
# What a resumed run may change: more epochs (upward only), what it logs and where, the loader and its
# workers (while the data stays the same), how often it keeps numbered checkpoints, its processes.
RESUMABLE = ("train.epochs", "train.checkpoint_every", "data.workers", "data.loader", "data.ffcv_path",
             "log.", "name", WORLD_SIZE)


def _listed(key: str, items: tuple[str, ...]) -> bool:
    return any(key == item or (item.endswith(".") and key.startswith(item)) for item in items)


def is_fingerprinted(key: str) -> bool:
    """Whether a flattened config key (e.g. "train.epochs") is part of the fingerprint."""
    return not _listed(key, EXCLUDED)


def is_resumable(key: str) -> bool:
    """Whether a resumed run may change this flattened config key (see RESUMABLE for its conditions)."""
    return _listed(key, RESUMABLE)


def digest_of(keys: dict[str, Any]) -> str:
    """Short, order-independent hash of a flat mapping (values compared by their JSON text)."""
    text = json.dumps({key: str(value) for key, value in keys.items()}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def fingerprint(cfg: Config, data_signature: str, *, steps_per_epoch: int) -> tuple[str, dict[str, str]]:
    """(digest, the keys hashed as strings) of a resolved config, its data and its real steps per epoch."""
    keys = {key: str(value) for key, value in flatten(cfg).items() if is_fingerprinted(key)}
    keys[DATA_SIGNATURE] = data_signature
    keys[STEPS_PER_EPOCH] = str(steps_per_epoch)
    return digest_of(keys), keys
