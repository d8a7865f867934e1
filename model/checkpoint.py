"""Load MAE checkpoints and hand the encoder to timm's VisionTransformer (fine-tuning, evaluation).

A checkpoint is a dict ``{"model": state_dict, "model_args": {...}}`` (the public MAE release
has only ``model``; pass ``preset=`` for those). Mismatches raise a ValueError naming the keys
and shapes instead of torch's size-mismatch dump.
"""

from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from model.mae import DEFAULTS, PRESETS, MaskedAutoencoderViT, build_mae

ENCODER_KEYS = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
TIMM_HEAD_KEYS = ("head.", "attn_pool.")  # freshly initialised by timm, never in an MAE checkpoint


def _read(path_or_dict: str | Path | dict) -> dict:
    ckpt = path_or_dict if isinstance(path_or_dict, dict) else torch.load(
        path_or_dict, map_location="cpu", weights_only=True)
    if "model" not in ckpt:
        raise ValueError(f"checkpoint has no 'model' entry; found keys {sorted(ckpt)[:10]}")
    return ckpt


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
    """timm VisionTransformer carrying a checkpoint's pretrained encoder (full MAE or encoder only).

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
