"""Read MAE checkpoints and exported encoders; hand the encoder to timm's VisionTransformer.

A checkpoint is a dict ``{"model": state_dict, "model_args": {...}}`` (the public MAE release
has only ``model``; pass ``preset=`` for those), or a folder written by ``model.export``. An
unreadable file (empty, truncated, random bytes, text, pickled objects) or a mismatch raises a
CheckpointError naming the file, the keys and shapes instead of torch's traceback. Writing and
resuming training checkpoints is run_folder.py's.
"""

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from errors import UserError
from model.mae import MaskedAutoencoderViT, build_mae
from model.presets import DEFAULTS, PRESETS

ENCODER_KEYS = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
WEIGHTS_FILE = "model.safetensors"  # an exported encoder (model.export): timm's files and the card
CONFIG_FILE = "config.json"
CARD_FILE = "model-card.json"
SIZE_KEYS = ("embed_dim", "depth", "num_heads", "patch_size")  # what makes two encoders the same size
TIMM_HEAD_KEYS = ("head.", "attn_pool.")  # freshly initialised by timm, never in an MAE checkpoint


class CheckpointError(UserError):
    """A checkpoint file that cannot be used: unreadable, or for another model or run."""


def read_checkpoint(path: str | Path) -> dict:
    """torch.load(weights_only=True) of a checkpoint dict with a 'model' entry, or a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    with open(path, "rb") as f:
        if f.read(2) != b"PK":  # torch.save writes a zip archive
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a zip archive: text or random "
                                  "bytes?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds pickled Python objects; refused (only tensors and plain "
                              "containers are loaded)") from None
    except Exception as err:  # torch reports a broken archive as RuntimeError, EOFError, KeyError, ...
        reason = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt: {reason})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {path} has no 'model' entry; found {found}")
    return ckpt


def check_preset_size(model_args: dict, preset: str) -> None:
    """Raise a ValueError when the checkpoint's architecture is not the named preset's size."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; allowed: {', '.join(sorted(PRESETS))}")
    expected = {**DEFAULTS, **PRESETS[preset]}
    have = {**DEFAULTS, **PRESETS.get(model_args.get("preset", ""), {}), **model_args}
    differing = {key: (have[key], expected[key]) for key in SIZE_KEYS if have[key] != expected[key]}
    if differing:
        found = ", ".join(f"{key}={have}" for key, (have, _) in differing.items())
        wanted = ", ".join(f"{key}={want}" for key, (_, want) in differing.items())
        raise ValueError(f"checkpoint is another model size ({found}) than --model {preset} ({wanted})")


def read_encoder(folder: str | Path) -> tuple[dict, dict[str, Any]]:
    """(encoder state dict, card) of a model.export folder; a clear error when it is not one."""
    folder = Path(folder)
    if not all((folder / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)):
        raise FileNotFoundError(f"{folder} is not an exported encoder (needs {CONFIG_FILE}, {WEIGHTS_FILE} "
                                f"and {CARD_FILE})")
    return load_file(folder / WEIGHTS_FILE), json.loads((folder / CARD_FILE).read_text())


def _read(path_or_dict: str | Path | dict) -> dict:
    if not isinstance(path_or_dict, dict) and Path(path_or_dict).is_dir():  # a model.export folder
        state, card = read_encoder(path_or_dict)
        return {"model": state, "model_args": card["model_args"]}
    if not isinstance(path_or_dict, dict):
        return read_checkpoint(path_or_dict)
    if "model" not in path_or_dict:
        raise CheckpointError(f"checkpoint has no 'model' entry; found keys {sorted(path_or_dict)[:10]}")
    return path_or_dict


def _model_args(ckpt: dict, preset: str | None) -> dict[str, Any]:
    args = ckpt.get("model_args")
    if args is None:
        if preset is None:
            raise ValueError(f"checkpoint has no 'model_args'; pass preset= one of {sorted(PRESETS)}")
        return {"preset": preset}
    if preset is not None and args.get("preset") != preset:
        raise ValueError(f"checkpoint holds a {args.get('preset')!r} model, not {preset!r}")
    return dict(args)


def _describe(args: dict[str, Any]) -> str:
    full = {**DEFAULTS, **PRESETS.get(args.get("preset", ""), {}), **args}
    sizes = ", ".join(f"{k}={full[k]}" for k in ("img_size", "patch_size", "embed_dim", "depth") if k in full)
    return f"{args.get('preset', 'model')} ({sizes})"


def _check_compatible(model: nn.Module, state: dict[str, Tensor], what: str,
                      optional: tuple[str, ...] = ()) -> None:
    """Raise a ValueError listing missing, unexpected and wrongly shaped keys, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} in checkpoint vs {tuple(v.shape)} in model"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    for label, keys in (("wrong shapes", wrong), ("missing keys", missing), ("unexpected keys", unexpected)):
        if keys:
            more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
            problems.append(f"{len(keys)} {label}: {'; '.join(keys[:4])}{more}")
    if problems:
        raise ValueError(f"checkpoint does not match {what}: " + " | ".join(problems))


def load_mae(path_or_dict: str | Path | dict, *, preset: str | None = None) -> MaskedAutoencoderViT:
    """Rebuild the MAE a checkpoint was trained as and load its weights strictly.

    preset: needed only for checkpoints without ``model_args`` (the public MAE release).
    """
    ckpt = _read(path_or_dict)
    args = _model_args(ckpt, preset)
    model = build_mae(**args)
    _check_compatible(model, ckpt["model"], _describe(model.model_args))
    model.load_state_dict(ckpt["model"], strict=True)
    return model


def export_encoder(mae: MaskedAutoencoderViT) -> dict[str, Tensor]:
    """Encoder weights under timm VisionTransformer names: cls_token, pos_embed, patch_embed, blocks, norm."""
    return {k: v for k, v in mae.state_dict().items() if k.startswith(ENCODER_KEYS)}


def build_timm_encoder(model_args: dict[str, Any], **timm_kwargs: Any) -> VisionTransformer:
    """timm VisionTransformer matching an MAE's encoder; defaults num_classes=0, global_pool='token'.

    timm_kwargs go to VisionTransformer (num_classes, global_pool, drop_path_rate, ...).
    """
    preset = model_args.get("preset", "vit_base")
    if preset not in PRESETS:
        raise ValueError(f"unknown MAE preset {preset!r}; choose one of {sorted(PRESETS)}")
    args = {**DEFAULTS, **PRESETS[preset], **model_args}
    kwargs = {k: args[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                                   "mlp_ratio")}
    kwargs.update(qkv_bias=True, num_classes=0, global_pool="token")
    kwargs.update(timm_kwargs)
    return VisionTransformer(**kwargs)


def load_encoder(path: str | Path | dict, *, preset: str | None = None,
                 **timm_kwargs: Any) -> VisionTransformer:
    """timm VisionTransformer carrying a checkpoint's pretrained encoder (full MAE, encoder only, or
    a `model.export` folder).

    A classifier head, if asked for, stays freshly initialised. With global_pool='avg' timm
    normalises after pooling (fc_norm); it starts from the encoder's final norm.
    """
    ckpt = _read(path)
    args = _model_args(ckpt, preset)
    model = build_timm_encoder(args, **timm_kwargs)
    state = {k: v for k, v in ckpt["model"].items() if k.startswith(ENCODER_KEYS)}
    if "fc_norm.weight" in model.state_dict() and "norm.weight" not in model.state_dict():
        state = {("fc_" + k if k.startswith("norm.") else k): v for k, v in state.items()}
    _check_compatible(model, state, f"timm encoder for {_describe(args)}", optional=TIMM_HEAD_KEYS)
    model.load_state_dict(state, strict=False)
    return model
