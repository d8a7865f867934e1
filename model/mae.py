"""Masked autoencoder with a ViT encoder, after He et al. (2022) and facebookresearch/mae.

Parameter names follow the public MAE release, so its checkpoints load with ``strict=True``.
The encoder sees only the visible patches named by a boolean mask (True = masked).
"""

from functools import partial
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from model.presets import DEFAULTS, PRESETS


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding, (1 + G*G, D) with a zero row for the cls token.

    The first half of the channels encodes the column, the second half the row, each as
    [sin, cos] over frequencies 1 / 10000^(k / (D/4)), as in the public MAE.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for sin-cos embeddings, got {embed_dim}")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                                torch.arange(grid_size, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (cols.flatten(), rows.flatten()):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), torch.cat(parts, dim=1)])
    return emb.float()


def mask_to_ids(mask: Tensor, num_visible: int | None = None) -> tuple[Tensor, Tensor]:
    """``ids_keep`` (B, K) and ``ids_restore`` (B, L), int64, for a bool mask (B, L), True = masked.

    The shuffle order lists visible patches first, each group in ascending patch order, so
    ``ids_keep`` is sorted and ``torch.gather(shuffled, 1, ids_restore)`` restores patch order.
    With ``num_visible`` (K, known when the masks are drawn) nothing is read on the host: a wrong
    count fails on the device (``torch._assert_async``), and torch.compile sees one graph. Without
    it, K is read on the host in one transfer (a sync) and every row is checked.
    """
    if mask.dtype != torch.bool or mask.ndim != 2:
        raise ValueError(f"mask must be a bool tensor (B, L); got {mask.dtype} of shape {tuple(mask.shape)}")
    visible = (~mask).sum(dim=1)
    if num_visible is None:
        fewest, most = torch.stack(torch.aminmax(visible)).tolist()
        if fewest != most:
            raise ValueError(f"every mask row needs the same number of visible patches; "
                             f"got {visible.tolist()}")
        num_visible = fewest
    else:
        torch._assert_async((visible == num_visible).all(), "a mask row has not num_visible visible patches")
    ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :num_visible], ids_restore


class MaskedAutoencoderViT(nn.Module):
    """MAE: ViT encoder on the visible patches, light ViT decoder predicting the masked pixels."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_pix_loss: bool = True):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        grid = self.patch_embed.grid_size[0]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(decoder_embed_dim, grid)[None],
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)

        self.patch_size = patch_size
        self.num_patches = num_patches
        self.norm_pix_loss = norm_pix_loss
        self.model_args: dict[str, Any] = {}  # filled by build_mae
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Public-MAE initialisation: xavier-uniform linears (patch embedding too), N(0, 0.02) tokens."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay besides biases and norms (read by timm's optimiser factory)."""
        return {"cls_token", "mask_token", "pos_embed", "decoder_pos_embed"}

    def patchify(self, imgs: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), patch pixels in (row, col, channel) order."""
        p = self.patch_size
        b, c, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, L, p*p*C) -> (B, C, H, W), the inverse of patchify."""
        p = self.patch_size
        b, n, d = x.shape
        g = int(n**0.5)
        c = d // (p * p)
        x = x.reshape(b, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)

    def visible_count(self, mask_ratio: float) -> int:
        """Patches left visible by a mask of this ratio (at least one), as the mask stage counts them."""
        return max(1, int(self.num_patches * (1 - mask_ratio)))

    def random_mask(self, batch: int, mask_ratio: float, device: torch.device) -> Tensor:
        """Uniform random mask (B, L), True = masked, int(L * (1 - mask_ratio)) visible per row."""
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        keep = self.visible_count(mask_ratio)
        ids_keep = torch.rand(batch, self.num_patches, device=device).argsort(dim=1)[:, :keep]
        mask = torch.ones(batch, self.num_patches, dtype=torch.bool, device=device)
        return mask.scatter_(1, ids_keep, False)

    def forward_encoder(self, imgs: Tensor, ids_keep: Tensor | None = None) -> Tensor:
        """Encode the patches in ids_keep (B, K), or all of them when None: (B, 1 + K, D) after the norm."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, latent: Tensor, ids_keep: Tensor) -> Tensor:
        """Place the encoded tokens among mask tokens and predict pixels: (B, L, p*p*C)."""
        x = self.decoder_embed(latent)
        b, _, d = x.shape
        # Slot 0 is the cls token, slot 1 + i is patch i; every slot not written keeps the mask token.
        slots = torch.cat([ids_keep.new_zeros(b, 1), ids_keep + 1], dim=1)
        full = self.mask_token.to(x.dtype).expand(b, self.num_patches + 1, d)
        x = full.scatter(1, slots.unsqueeze(-1).expand(-1, -1, d), x) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error over masked patches only; per-patch normalised targets if norm_pix_loss."""
        target = self.patchify(imgs.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: Tensor, mask: Tensor | None = None, mask_ratio: float = 0.75,
                num_visible: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (loss, pred (B, L, p*p*C), mask as float 0/1 with 1 = masked).

        mask: bool (B, L), True = masked, the same number of visible patches per row; None draws a
        uniform random mask with mask_ratio. num_visible: that number, when the caller knows it (the
        trainer does): the forward then reads nothing on the host (see `mask_to_ids`).
        """
        if mask is None:
            mask = self.random_mask(imgs.shape[0], mask_ratio, imgs.device)
            num_visible = self.visible_count(mask_ratio)
        elif mask.shape != (imgs.shape[0], self.num_patches):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match (batch, patches) = "
                             f"({imgs.shape[0]}, {self.num_patches})")
        mask = mask.to(imgs.device)
        ids_keep, _ = mask_to_ids(mask, num_visible)
        latent = self.forward_encoder(imgs, ids_keep)
        pred = self.forward_decoder(latent, ids_keep)
        mask = mask.float()
        return self.forward_loss(imgs, pred, mask), pred, mask

    def forward_features(self, imgs: Tensor) -> Tensor:
        """Encoder on all patches, no masking: (B, 1 + L, D) after the final norm (like timm)."""
        return self.forward_encoder(imgs)


def build_mae(preset: str = "vit_base", **overrides: Any) -> MaskedAutoencoderViT:
    """Build an MAE from a preset name (see PRESETS) with keyword overrides, e.g. img_size=32.

    The returned model's ``model_args`` holds the preset and every argument, so
    ``build_mae(**model.model_args)`` rebuilds the same architecture.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown MAE preset {preset!r}; choose one of {sorted(PRESETS)}")
    args = {**DEFAULTS, **PRESETS[preset]}
    unknown = sorted(set(overrides) - set(args))
    if unknown:
        raise ValueError(f"unknown MAE argument(s) {unknown}; allowed: {sorted(args)}")
    args.update(overrides)
    if args["img_size"] % args["patch_size"]:
        raise ValueError(f"img_size {args['img_size']} is not divisible by patch_size {args['patch_size']}")
    for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
        if args[width] % args[heads]:
            raise ValueError(f"{width} {args[width]} is not divisible by {heads} {args[heads]}")
    model = MaskedAutoencoderViT(**args)
    model.model_args = {"preset": preset, **args}
    return model
