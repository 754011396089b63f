"""MAE: visible-only encoder, letterbox-aware masking, per-patch normalised loss."""

import pytest
import timm
import torch

from radpretrain.data.dataset import StoreDataset
from radpretrain.synthetic.toy import make_toy_store
from radpretrain.methods.mae import MAE, patchify, random_masking, unpatchify

CFG = {"seed": 0, "data": {"image_size": 32, "mean": 0.3, "std": 0.2},
       "model": {"backbone": "vit_tiny", "patch_size": 8, "kwargs": {"depth": 2}},
       "mae": {"mask_ratio": 0.75, "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
       "optim": {"lr": 2e-3}}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = make_toy_store(tmp_path_factory.mktemp("toy"), n_patients=8, images_per_patient=2)
    ds = StoreDataset(root, image_size=32)
    return torch.utils.data.default_collate([ds[i] for i in range(16)])


def padded_valid(b=4, s=32, pad_rows=12):
    valid = torch.ones(b, 1, s, s, dtype=torch.bool)
    valid[1, :, :pad_rows] = False           # top 12 rows padding: 1 pure-padding patch row + a partial one
    valid[2, :, :, -20:] = False             # right 20 columns
    return valid


def test_patchify_roundtrip():
    x = torch.rand(2, 1, 32, 48)
    assert torch.equal(unpatchify(patchify(x, 8), 8, 4, 6), x)


def test_padding_patches_are_never_visible():
    valid = padded_valid()
    vp = patchify(valid.float(), 8).sum(-1) > 0
    assert (~vp).sum() > 0
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        keep, mask = random_masking(vp, 0.75, g)
        visible = torch.zeros_like(vp).scatter_(1, keep, True)
        assert not (visible & ~vp).any()          # visible set ∩ padding = ∅
        assert torch.equal(visible, ~mask)
        assert keep.shape[1] == round(0.25 * int(vp.sum(1).min()))


def test_loss_mask_excludes_padding_and_uses_only_valid_pixels():
    torch.manual_seed(0)
    m = MAE(CFG)
    img = torch.rand(4, 1, 32, 32)
    valid = padded_valid()
    img = img * valid
    out = m.forward_mae({"image": img, "valid": valid}, torch.Generator().manual_seed(1))
    assert not (out["loss_mask"] & ~out["valid_patch"]).any()
    assert torch.equal(out["loss_mask"], out["mask"] & out["valid_patch"])
    # the padded part of partly padded patches does not enter the loss target: changing the
    # decoder's prediction there changes nothing
    target_pix = patchify(valid.float(), 8)
    assert (target_pix[out["loss_mask"]].sum(-1) > 0).all()


def test_encoder_is_plain_timm_and_full_path_matches_forward_features(rel_err):
    torch.manual_seed(0)
    m = MAE(CFG).eval()
    arch, kw = m.arch, m.model_kwargs
    plain = timm.create_model(arch, **kw)
    plain.load_state_dict(m.encoder.state_dict())   # strict: plain timm key names
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert rel_err(m.encode_visible(x, None), m.encoder.forward_features(x)) < 1e-5
        # non-square (bucket) input works with resampled position embeddings
        out = m.forward_mae({"image": torch.rand(2, 1, 32, 48)})
    assert out["mask"].shape == (2, 24) and torch.isfinite(out["loss"])


def test_visible_patch_embedding_matches_the_conv(rel_err):
    torch.manual_seed(0)
    m = MAE(CFG).eval()
    x = torch.randn(2, 1, 32, 32)
    keep_all = torch.arange(16).repeat(2, 1)
    perm = torch.stack([torch.randperm(16) for _ in range(2)])
    with torch.no_grad():
        full = m.encode_visible(x, None)
        assert rel_err(m.encode_visible(x, keep_all), full) < 1e-5
        # a subset gives the tokens of those patches (up to attention over fewer tokens): check
        # the embedding itself through a zero-depth run
        m.encoder.blocks = torch.nn.Sequential()
        sub = m.encode_visible(x, perm[:, :4])
        ref = m.encode_visible(x, None)[:, 1:]
        assert rel_err(sub[:, 1:], torch.gather(ref, 1, perm[:, :4, None].expand(-1, -1, ref.shape[-1]))) < 1e-5


def test_encoder_sees_only_visible_tokens():
    m = MAE(CFG)
    seen = {}

    def hook(mod, inp, outp):
        seen["n"] = inp[0].shape[1]

    m.encoder.blocks[0].register_forward_hook(hook)
    m.forward_mae({"image": torch.rand(2, 1, 32, 32), "valid": torch.ones(2, 1, 32, 32, dtype=torch.bool)})
    assert seen["n"] == 1 + 4  # CLS + 25 % of 16 patches


def test_loss_decreases_on_toy_store(batch, loss_before_after):
    torch.manual_seed(0)
    m = MAE(CFG)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)

    def eval_loss():
        with torch.no_grad():
            return float(m.forward_mae(batch, torch.Generator().manual_seed(123))["loss"])

    before, after = loss_before_after(m, opt, batch, eval_loss, 15)
    assert after < 0.85 * before, (before, after)


def test_previews_and_meta(batch, tmp_path):
    m = MAE(CFG)
    paths = m.save_previews(batch, tmp_path)
    assert len(paths) == 1 and paths[0].stat().st_size > 100
    meta = m.encoder_meta()
    assert meta["arch"] == "vit_tiny_patch16_224" and meta["model_kwargs"]["patch_size"] == 8
    assert meta["preprocessing"] == {"mean": pytest.approx(0.3), "std": pytest.approx(0.2)}


def test_rejects_cnn_backbone():
    from radpretrain.errors import UserError

    with pytest.raises(UserError, match="ViT"):
        MAE({**CFG, "model": {"backbone": "resnet18"}})


def test_export_records_mean_token_pooling_for_plain_timm(tmp_path):
    from radpretrain.errors import UserError
    from radpretrain.models.weights import load_run_encoder, save_encoder

    torch.manual_seed(0)
    m = MAE(CFG).eval()
    meta = m.encoder_meta()
    assert meta["model_kwargs"]["global_pool"] == "avg" and meta["model_kwargs"]["fc_norm"] is False
    save_encoder(m.encoder, meta, tmp_path)
    loaded, _ = load_run_encoder(tmp_path)
    plain = timm.create_model(meta["arch"], **meta["model_kwargs"])
    plain.load_state_dict(loaded.state_dict())  # same key names as the trained encoder
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        tokens = m.encoder.forward_features(x)
        want = tokens[:, m.encoder.num_prefix_tokens:].mean(1)  # evaluate's pool=mean
        assert torch.allclose(loaded(x), want, atol=1e-5) and torch.allclose(plain.eval()(x), want, atol=1e-5)
    token = MAE({**CFG, "mae": {**CFG["mae"], "global_pool": "token"}}).encoder_meta()
    assert "global_pool" not in token["model_kwargs"]
    with pytest.raises(UserError, match="global_pool"):
        MAE({**CFG, "mae": {**CFG["mae"], "global_pool": "max"}})
