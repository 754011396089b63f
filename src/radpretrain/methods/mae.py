"""Masked autoencoder (MAE).

He, Chen, Xie, Li, Dollár, Girshick: *Masked Autoencoders Are Scalable Vision
Learners*, CVPR 2022.  Used on radiographs by the MAE pilot study: Bühler (supervised
by Hager), *Pilot Study For Large-Scale Radiograph Pre-training*, TU München (ViT,
224 px, mask ratio 0.75, early stopping on the validation loss with a patience of 10
epochs, ImageNet initialisation).

A random ``mask_ratio`` of the patches is hidden; the timm ViT encoder runs on the
*visible* patches only (that is where MAE's speed comes from), a light
transformer decoder fills the hidden positions with a learned mask token and
predicts their pixels; the loss is the mean squared error on the hidden patches,
each target patch normalised by its own mean and variance (``norm_pix_loss``).

Letterbox awareness (the pilot's "border tokens" future work): patches that are
entirely padding (``valid`` False everywhere) are never visible and never in the
loss; partly padded patches are normalised and scored on their valid pixels only.
The number of visible patches is the same for every image of a batch:
``round((1 - mask_ratio) * n_valid)`` for the image with the fewest valid patches.

``self.encoder`` is the plain timm ``VisionTransformer`` (its ``state_dict`` keys are
timm's); the decoder is discarded after pretraining.  The pooling the exported encoder
should use is written into ``encoder.json``'s ``model_kwargs`` (``mae.global_pool``):
``avg`` (default: the mean of the patch tokens after the final norm, i.e. timm's
``global_pool="avg", fc_norm=False``, same weights and key names) or ``token`` (timm's
class-token default).  The loss is on the patch tokens only (the class token reaches it
only through the decoder's attention), so after a short run the class token can be nearly
untrained: an outside test found it at chance where the mean did far better, and on the
recipe study's validation folds the mean won 10 of 18 comparisons (docs/benchmarks.md,
"Recipe study").  ``load_encoder``, ``evaluate`` and a plain
``timm.create_model(arch, **model_kwargs)`` all get the recorded pooling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from radpretrain.config import get
from radpretrain.errors import UserError
from radpretrain.methods.base import Paper, PretrainMethod, Supervision, register


@dataclass
class MAESection:
    mask_ratio: float = field(default=0.75, metadata={"ge": 0.0, "lt": 1.0})
    norm_pix_loss: bool = True
    decoder_dim: int | None = field(default=None, metadata={"ge": 4, "help": "a multiple of 4, or null (half the encoder's width)"})
    decoder_depth: int = field(default=2, metadata={"ge": 1})
    decoder_heads: int | None = field(default=None, metadata={"ge": 1, "help": "a positive integer, or null (decoder_dim // 32)"})
    global_pool: Literal["avg", "token"] = "avg"  # the pooling recorded in encoder.json (see the module docstring)


def sincos_2d(dim: int, gh: int, gw: int, device=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding [gh * gw, dim] (MAE's decoder embedding)."""
    if dim % 4:
        raise ValueError(f"decoder dim must be a multiple of 4, got {dim}")
    d = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(d, dtype=torch.float32, device=device) / d))
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float32, device=device),
                            torch.arange(gw, dtype=torch.float32, device=device), indexing="ij")
    oy = ys.reshape(-1, 1) * omega[None]
    ox = xs.reshape(-1, 1) * omega[None]
    return torch.cat([oy.sin(), oy.cos(), ox.sin(), ox.cos()], dim=1)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C] (row-major patches)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, gh: int, gw: int, c: int = 1) -> torch.Tensor:
    b = x.shape[0]
    x = x.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, gh * p, gw * p)


def random_masking(valid_patches: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None):
    """Choose visible patches per image, never a pure-padding one.

    ``valid_patches``: bool [B, N], True where a patch has at least one image pixel.
    Returns ``(keep_idx [B, K], mask [B, N] bool True = hidden)``; ``K`` is the same for
    the whole batch.
    """
    b, n = valid_patches.shape
    n_valid = valid_patches.sum(1)
    k = int(round((1.0 - mask_ratio) * int(n_valid.min())))
    k = max(1, min(k, int(n_valid.min()) if int(n_valid.min()) > 0 else 1))
    noise = torch.rand(b, n, generator=generator, device=valid_patches.device)
    noise = noise.masked_fill(~valid_patches, 2.0)  # padding sorts last: never among the first k
    keep_idx = noise.argsort(dim=1)[:, :k]
    mask = torch.ones(b, n, dtype=torch.bool, device=valid_patches.device)
    mask.scatter_(1, keep_idx, False)
    return keep_idx, mask


class MAEDecoder(nn.Module):
    """Light transformer decoder: embed, add mask tokens, fixed 2-D positions, blocks, pixel head."""

    def __init__(self, enc_dim: int, dim: int, depth: int, heads: int, patch: int, in_chans: int = 1):
        super().__init__()
        from timm.models.vision_transformer import Block  # heavy (3 s): only where a model is built

        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch * patch * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        self.dim = dim

    def forward(self, tokens: torch.Tensor, keep_idx: torch.Tensor, n: int, gh: int, gw: int, n_prefix: int):
        x = self.embed(tokens)
        b, _, d = x.shape
        prefix, vis = x[:, :n_prefix], x[:, n_prefix:]
        full = self.mask_token.to(x.dtype).expand(b, n, d).clone()
        full.scatter_(1, keep_idx.unsqueeze(-1).expand(-1, -1, d), vis)
        full = full + sincos_2d(d, gh, gw, x.device).to(x.dtype)[None]
        x = torch.cat([prefix, full], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, n_prefix:]


@register("mae")
class MAE(PretrainMethod):
    """Masked autoencoder on a timm ViT; config keys under ``mae.`` (see configs/mae_cpu.yaml)."""

    display_name = "Masked autoencoder (MAE)"
    paper = Paper("Masked Autoencoders Are Scalable Vision Learners",
                  ("He", "Chen", "Xie", "Li", "Dollár", "Girshick"), 2022, "CVPR", "https://arxiv.org/abs/2111.06377")
    supervision = Supervision.MASKED_IMAGE_MODELLING
    config_sections = {"mae": MAESection}
    preview_name = "mae_reconstruction"

    def __init__(self, cfg: dict, store=None):
        super().__init__(cfg, store)
        if not self.backbone_is_vit():
            raise UserError(f"mae needs a ViT backbone (vit_tiny, vit_small, vit_base), got model.backbone={self.backbone!r}")
        image_size = int(get(cfg, "data.image_size", 224))
        patch = int(get(cfg, "model.patch_size", 16) or 16)
        if image_size % patch:
            raise UserError(f"data.image_size={image_size} must be a multiple of model.patch_size={patch}")
        enc = self.build_encoder()
        if getattr(enc, "reg_token", None) is not None or getattr(enc, "no_embed_class", False):
            raise UserError(f"{self.arch}: ViTs with register tokens / no_embed_class are not supported by mae")
        self.patch = patch
        self.mask_ratio = float(get(cfg, "mae.mask_ratio", 0.75))
        if not 0.0 <= self.mask_ratio < 1.0:
            raise UserError(f"mae.mask_ratio={self.mask_ratio}: must be in [0, 1)")
        self.norm_pix = bool(get(cfg, "mae.norm_pix_loss", True))
        # light decoder; default width = half the encoder's (MAE: 512 for ViT-L's 1024), 32-dim heads
        ddim = int(get(cfg, "mae.decoder_dim", None) or enc.embed_dim // 2)
        dheads = int(get(cfg, "mae.decoder_heads", None) or max(1, ddim // 32))
        if ddim % 4 or ddim % dheads:
            raise UserError(f"mae.decoder_dim={ddim} must be a multiple of 4 and of mae.decoder_heads={dheads}")
        self.decoder = MAEDecoder(enc.embed_dim, ddim, int(get(cfg, "mae.decoder_depth", 2)), dheads, patch)
        self.global_pool = str(get(cfg, "mae.global_pool", "avg") or "avg")
        if self.global_pool not in ("avg", "token"):
            raise UserError(f"mae.global_pool={self.global_pool!r}: choose avg (mean of the patch tokens) or token "
                            "(the class token)")

    # -- model ---------------------------------------------------------------
    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """Encoder patch position embeddings [1, gh*gw, D], resampled when the grid differs (buckets)."""
        enc = self.encoder
        n_prefix = enc.num_prefix_tokens
        pos = enc.pos_embed
        grid = tuple(enc.patch_embed.grid_size)
        if (gh, gw) != grid:
            from timm.layers import resample_abs_pos_embed  # heavy (3 s): only where a model is built

            pos = resample_abs_pos_embed(pos, new_size=(gh, gw), old_size=grid, num_prefix_tokens=n_prefix)
        return pos

    def encode_visible(self, x: torch.Tensor, keep_idx: torch.Tensor | None):
        """Run the timm ViT on the visible patches (all when ``keep_idx`` is None); returns tokens incl. CLS."""
        enc = self.encoder
        b, _, h, w = x.shape
        p = self.patch
        gh, gw = h // p, w // p
        pos = self._pos_embed(gh, gw)
        n_prefix = enc.num_prefix_tokens
        pos_p = pos[:, n_prefix:].expand(b, -1, -1)
        proj = enc.patch_embed.proj
        if keep_idx is None:
            t = proj(x).flatten(2).transpose(1, 2)  # [B, N, D]
        else:  # embed the visible patches only: the conv is a linear map of each flattened patch
            patches = patchify(x, p)
            patches = torch.gather(patches, 1, keep_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
            w = proj.weight.permute(0, 2, 3, 1).reshape(proj.weight.shape[0], -1)  # (p, p, C) order as patchify
            t = F.linear(patches, w, proj.bias)
            pos_p = torch.gather(pos_p, 1, keep_idx.unsqueeze(-1).expand(-1, -1, pos_p.shape[-1]))
        t = enc.patch_embed.norm(t) + pos_p
        if enc.cls_token is not None:
            cls = enc.cls_token + pos[:, :1]
            t = torch.cat([cls.expand(b, -1, -1), t], dim=1)
        t = enc.norm_pre(enc.pos_drop(t))
        t = enc.blocks(t)
        return enc.norm(t)

    def forward_mae(self, batch: dict, generator: torch.Generator | None = None) -> dict:
        img = batch["image"]
        valid = batch.get("valid")
        if valid is None:
            valid = torch.ones_like(img, dtype=torch.bool)
        p = self.patch
        b, _, h, w = img.shape
        if h % p or w % p:
            raise UserError(f"image shape {h}x{w} is not a multiple of the patch size {p}")
        gh, gw = h // p, w // p
        vpix = patchify(valid.to(img.dtype), p)  # [B, N, p*p] 1 on image pixels
        valid_patch = vpix.sum(-1) > 0
        keep_idx, mask = random_masking(valid_patch, self.mask_ratio, generator)
        tokens = self.encode_visible(self.normalize(img), keep_idx)
        n_prefix = self.encoder.num_prefix_tokens
        pred = self.decoder(tokens, keep_idx, gh * gw, gh, gw, n_prefix).float()
        target = patchify(img.float(), p)
        cnt = vpix.sum(-1, keepdim=True).clamp_min(1.0)
        mean = (target * vpix).sum(-1, keepdim=True) / cnt
        var = (((target - mean) ** 2) * vpix).sum(-1, keepdim=True) / cnt
        if self.norm_pix:
            target_n = (target - mean) / (var + 1e-6).sqrt()
        else:
            target_n = target
        err = ((pred - target_n) ** 2 * vpix).sum(-1) / cnt.squeeze(-1)  # per patch, valid pixels only
        loss_mask = mask & valid_patch
        loss = (err * loss_mask).sum() / loss_mask.sum().clamp_min(1)
        return {"loss": loss, "pred": pred, "mask": mask, "keep_idx": keep_idx, "valid_patch": valid_patch,
                "loss_mask": loss_mask, "mean": mean, "var": var, "grid": (gh, gw)}

    def compile_modules(self) -> list[nn.Module]:
        # the step calls the ViT's parts, not its forward: compile the transformer blocks of both halves
        return [self.encoder.blocks, self.decoder]

    def compute_loss(self, batch, batch_idx):
        out = self.forward_mae(batch, self.step_generator(batch_idx))
        return {"loss": out["loss"], "visible": torch.tensor(float(out["keep_idx"].shape[1]))}

    # -- previews ------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, batch: dict, generator=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input, masked input, reconstruction with the visible patches pasted back), all [B, 1, H, W] in [0, 1]."""
        out = self.forward_mae(batch, generator)
        img = batch["image"].float()
        p = self.patch
        gh, gw = out["grid"]
        pred = out["pred"]
        if self.norm_pix:
            pred = pred * (out["var"] + 1e-6).sqrt() + out["mean"]
        m = out["mask"].unsqueeze(-1).float()
        lm = out["loss_mask"].unsqueeze(-1).float()  # hidden image patches; padding stays padding
        target = patchify(img, p)
        recon = unpatchify(pred * lm + target * (1 - lm), p, gh, gw).clamp(0, 1)
        masked = unpatchify(target * (1 - m), p, gh, gw)
        return img, masked, recon

    def preview_rows(self, batch: dict, generator: torch.Generator) -> list[torch.Tensor]:
        """Rows: input, visible patches, reconstruction (visible patches pasted back)."""
        return list(self.reconstruct(batch, generator))

    def encoder_meta(self) -> dict:
        meta = super().encoder_meta()
        if self.global_pool == "avg":
            # the final norm stays on every token (fc_norm=False keeps timm's key names), then the mean
            meta["model_kwargs"].update(global_pool="avg", fc_norm=False)
        meta["mae"] = {"mask_ratio": self.mask_ratio, "patch_size": self.patch, "norm_pix_loss": self.norm_pix,
                       "global_pool": self.global_pool}
        return meta
