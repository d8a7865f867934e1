"""MAE model: masking, loss, public-MAE names, timm export and checkpoint errors (demo sizes, CPU)."""

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import timm.optim
import torch

from model import PRESETS, build_mae, build_timm_encoder, export_encoder, load_encoder, load_mae, mask_to_ids

BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias"]


def public_mae_keys(depth: int, decoder_depth: int) -> set[str]:
    """The state-dict keys of facebookresearch/mae's MaskedAutoencoderViT."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
            "norm.bias", "mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias",
            "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    keys |= {f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS}
    keys |= {f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in BLOCK_KEYS}
    return keys


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def demo():
    torch.manual_seed(0)
    return build_mae("demo").eval()


def images(batch=2, size=32, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_forward_backward(demo):
    model = build_mae("demo")
    loss, pred, mask = model(images(), mask_ratio=0.75)
    assert torch.isfinite(loss) and loss.dim() == 0
    assert pred.shape == (2, 64, 4 * 4 * 3)
    assert mask.dtype == torch.float32 and mask.sum(1).tolist() == [48.0, 48.0]
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "pos_embed" not in trainable and "decoder_pos_embed" not in trainable
    assert all(model.get_parameter(n).grad is not None for n in trainable)


def test_bf16_autocast_forward(demo):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = demo(images())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_encoder_sees_exactly_the_visible_patches(demo):
    imgs = images()
    mask = demo.random_mask(2, 0.75, imgs.device)
    seen = []
    hook = demo.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    latent_out = []
    hook2 = demo.norm.register_forward_hook(lambda _m, _a, out: latent_out.append(out))
    try:
        demo(imgs, mask)
        masked_patch = int(mask[0].nonzero()[0])
        visible_patch = int((~mask[0]).nonzero()[0])
        for patch in (masked_patch, visible_patch):
            changed = imgs.clone()
            row, col = divmod(patch, 8)
            changed[0, :, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4] += 3.0
            demo(changed, mask)
    finally:
        hook.remove()
        hook2.remove()
    assert seen[0] == (2, 1 + 16, 192)
    torch.testing.assert_close(latent_out[1], latent_out[0])  # masked patch changed: same encoding
    assert not torch.allclose(latent_out[2][0], latent_out[0][0])  # visible patch changed: differs


def test_the_model_imports_no_other_package_of_the_project():
    """model/ stands alone: building and running an MAE loads none of noise, pipelines, configs, eval."""
    code = ("import sys, torch\nfrom model import build_mae\n"
            "build_mae('demo', depth=1, decoder_depth=1)(torch.randn(1, 3, 32, 32))\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'noise', 'pipelines', 'configs', 'eval', "
            "'tracking', 'train'}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_decoder_places_tokens_like_the_public_unshuffle(demo):
    mask = demo.random_mask(2, 0.75, torch.device("cpu"))
    ids_keep, ids_restore = mask_to_ids(mask)
    latent = torch.randn(2, 1 + 16, 192)
    with torch.no_grad():
        ours = demo.forward_decoder(latent, ids_keep)
        x = demo.decoder_embed(latent)  # reference: append mask tokens, then unshuffle with ids_restore
        tokens = torch.cat([x[:, 1:], demo.mask_token.expand(2, 64 - 16, -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, 128))
        x = torch.cat([x[:, :1], tokens], dim=1) + demo.decoder_pos_embed
        for block in demo.decoder_blocks:
            x = block(x)
        reference = demo.decoder_pred(demo.decoder_norm(x))[:, 1:]
    torch.testing.assert_close(ours, reference)


def test_forward_rejects_bad_masks(demo):
    with pytest.raises(ValueError, match="does not match"):
        demo(images(), torch.ones(2, 10, dtype=torch.bool))
    uneven = torch.ones(2, 64, dtype=torch.bool)
    uneven[0, :16], uneven[1, :17] = False, False
    with pytest.raises(ValueError, match="same number of visible patches"):
        demo(images(), uneven)
    with pytest.raises(ValueError, match="bool"):
        demo(images(), uneven.float())
    with pytest.raises(ValueError, match="mask_ratio"):
        demo(images(), mask_ratio=1.0)


def test_loss_ignores_visible_patches(demo):
    imgs = images()
    mask = demo.random_mask(2, 0.75, imgs.device).float()
    pred = torch.randn(2, 64, 48)
    ramp = torch.zeros(2, 1, 48)
    ramp[0, 0] = torch.linspace(0, 3, 48)  # image 0 only; not constant, so it survives per-patch norm
    base = demo.forward_loss(imgs, pred, mask)
    visible, masked = (~mask[0].bool()).nonzero()[0, 0], mask[0].nonzero()[0, 0]
    for patch, should_change in ((visible, False), (masked, True)):
        new_pred = pred.clone()
        new_pred[0, patch] += 1.0
        new_imgs = demo.unpatchify(demo.patchify(imgs).index_add(1, patch[None], ramp))
        for loss in (demo.forward_loss(imgs, new_pred, mask), demo.forward_loss(new_imgs, pred, mask)):
            assert (not torch.allclose(loss, base)) == should_change


def test_norm_pix_target(demo):
    imgs = images()
    mask = demo.random_mask(2, 0.75, imgs.device).float()
    target = demo.patchify(imgs)
    normed = (target - target.mean(-1, keepdim=True)) / target.std(-1, keepdim=True)
    assert demo.forward_loss(imgs, normed, mask) < 1e-6
    # Per-patch normalisation makes the loss blind to a per-patch brightness/contrast change.
    rescaled = demo.unpatchify(target * 2.5 + 0.7)
    base = demo.forward_loss(imgs, normed, mask)
    torch.testing.assert_close(demo.forward_loss(rescaled, normed, mask), base)
    raw = build_mae("demo", norm_pix_loss=False)
    assert raw.forward_loss(imgs, target, mask) == 0
    assert raw.forward_loss(rescaled, target, mask) > 0.1


def test_patchify_round_trip(demo):
    imgs = images()
    torch.testing.assert_close(demo.unpatchify(demo.patchify(imgs)), imgs)
    # Patch 1 is the top row's second patch, pixels in (row, col, channel) order.
    torch.testing.assert_close(demo.patchify(imgs)[0, 1], imgs[0, :, 0:4, 4:8].permute(1, 2, 0).flatten())


def test_sincos_pos_embed_layout(demo):
    pos = demo.pos_embed[0]
    assert not demo.pos_embed.requires_grad and torch.all(pos[0] == 0)
    grid = pos[1:].reshape(8, 8, 192)
    half = 96
    torch.testing.assert_close(grid[:, :, :half], grid[:1, :, :half].expand(8, -1, -1))  # column code
    torch.testing.assert_close(grid[:, :, half:], grid[:, :1, half:].expand(-1, 8, -1))  # row code
    torch.testing.assert_close(grid[0, 3, 0], torch.tensor(3.0).sin())


def test_public_mae_checkpoint_round_trip(demo, tmp_path):
    assert set(demo.state_dict()) == public_mae_keys(depth=6, decoder_depth=2)
    path = tmp_path / "public.pth"
    torch.save({"model": demo.state_dict()}, path)  # the public release format: no model_args
    loaded = load_mae(path, preset="demo")
    for key, value in demo.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    ours = load_mae({"model": demo.state_dict(), "model_args": demo.model_args})
    assert ours.model_args == demo.model_args


@pytest.mark.parametrize(("preset", "timm_name"), [("vit_base", "vit_base_patch16_224"),
                                                    ("vit_large", "vit_large_patch16_224"),
                                                    ("vit_huge", "vit_huge_patch14_224")])
def test_paper_sizes_match_public_and_timm_names(preset, timm_name):
    with torch.device("meta"):
        mae = build_mae(preset)
        vit = timm.create_model(timm_name, pretrained=False, num_classes=0)
    args = PRESETS[preset]
    assert set(mae.state_dict()) == public_mae_keys(args["depth"], args["decoder_depth"])
    exported = {k: v.shape for k, v in export_encoder(mae).items()}
    assert exported == {k: v.shape for k, v in vit.state_dict().items()}


def test_exported_encoder_matches_forward_features(demo, tmp_path):
    vit = build_timm_encoder(demo.model_args).eval()
    vit.load_state_dict(export_encoder(demo), strict=True)
    imgs = images()
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(imgs), demo.forward_features(imgs))
    path = tmp_path / "ckpt.pth"
    torch.save({"model": demo.state_dict(), "model_args": demo.model_args}, path)
    classifier = load_encoder(path, num_classes=10, global_pool="avg")
    torch.testing.assert_close(classifier.fc_norm.weight, demo.norm.weight)
    assert classifier(imgs).shape == (2, 10)


def test_wrong_size_checkpoint_gives_clear_error(demo):
    other = build_mae("demo", embed_dim=96)
    with pytest.raises(ValueError, match=r"wrong shapes: .*pos_embed \(1, 65, 96\) in checkpoint"):
        load_mae({"model": other.state_dict(), "model_args": demo.model_args})
    with pytest.raises(ValueError, match="checkpoint does not match timm encoder"):
        load_encoder({"model": other.state_dict(), "model_args": demo.model_args})
    with pytest.raises(ValueError, match="no 'model_args'; pass preset="):
        load_mae({"model": demo.state_dict()})
    with pytest.raises(ValueError, match="holds a 'demo' model, not 'vit_tiny'"):
        load_mae({"model": demo.state_dict(), "model_args": demo.model_args}, preset="vit_tiny")
    with pytest.raises(ValueError, match="missing keys: mask_token"):
        load_mae({"model": export_encoder(demo)}, preset="demo")


def test_build_mae_validation():
    with pytest.raises(ValueError, match="unknown MAE preset"):
        build_mae("vit_giant")
    with pytest.raises(ValueError, match="unknown MAE argument"):
        build_mae("demo", width=3)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        build_mae("demo", img_size=30)
    model = build_mae("demo", img_size=48)
    assert build_mae(**model.model_args).model_args == model.model_args
    assert model.num_patches == 144


def test_timm_optimizer_skips_decay_on_tokens_norms_biases(demo):
    optimizer = timm.optim.create_optimizer_v2(demo, "adamw", lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in demo.named_parameters()}
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "decoder_pred.bias"} <= by_decay[0.0]
    assert all(n.endswith("weight") and "norm" not in n for n in by_decay[0.05])
    assert "blocks.0.attn.qkv.weight" in by_decay[0.05]
    assert "pos_embed" not in by_decay[0.0] | by_decay[0.05]  # fixed, not trained


@pytest.mark.gpu
def test_cuda_step_matches_cpu_and_runs_in_bf16(demo):
    imgs = images()
    mask = demo.random_mask(2, 0.75, imgs.device)
    cpu_loss, _, _ = demo(imgs, mask)
    model = build_mae("demo").cuda()
    model.load_state_dict(demo.state_dict())
    cuda_loss, _, _ = model(imgs.cuda(), mask.cuda())
    torch.testing.assert_close(cuda_loss.cpu(), cpu_loss, rtol=1e-2, atol=1e-3)  # TF32 convs
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, pred, _ = model(imgs.cuda(), mask.cuda())
    loss.backward()
    assert pred.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
