"""Presets: the tiny default, the SD1.5 configuration on the meta device, clear errors."""
from __future__ import annotations

import pytest
import torch

from sim.core.models import build_controlnet, count_params, get_preset, load_base


def test_sd15_preset_has_sd15_sizes_without_any_download():
    base = load_base("sd15", device="meta")
    unet_m = count_params(base.unet) / 1e6
    cn = build_controlnet(base.unet, base.preset)
    assert 855 < unet_m < 865  # SD1.5 UNet: 859.5 M parameters
    assert 355 < count_params(cn) / 1e6 < 365  # SD1.5 ControlNet: ~361 M
    assert 80 < count_params(base.autoencoder) / 1e6 < 90  # SD VAE: 83.7 M
    assert base.unet.conv_in.weight.shape == (320, 4, 3, 3)
    assert base.preset.latent_size == 64
    assert all(not p.requires_grad for p in base.unet.parameters())


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="tiny"):
        get_preset("sdxl")


def test_missing_tiny_checkpoint_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain-base"):
        load_base("tiny", folder=tmp_path)


def test_minilm_text_encoder_gives_token_states_and_zero_padding():
    from sim.core.text import MiniLMTextEncoder

    enc = MiniLMTextEncoder(max_tokens=16)
    a, b = enc(["a red circle on a blue background", "a blue circle on a red background"])
    assert a.shape == (16, 384)
    assert (a[12:] == 0).all()  # padding positions are zeroed
    assert not torch.allclose(a, b)  # word order matters in the token states
    assert all(not p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize("preset", ["tiny", "sd15-mini"])
def test_controlnet_encoder_computes_the_unets_encoder_function(preset):
    """from_unet copies weights; we also restore the config it forgets (text-pooling heads)."""
    from sim.core.cuts import _down, time_embedding
    from sim.core.models import build_unet

    p = get_preset(preset)
    unet = build_unet(p, seed=1)
    cn = build_controlnet(unet, p)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, p.block_out_channels[0], p.latent_size, p.latent_size, generator=g)
    t = torch.tensor([7, 640])
    ctx = torch.randn(2, p.max_tokens, p.cross_attention_dim, generator=g)
    with torch.no_grad():
        emb_u, emb_c = time_embedding(unet, t, ctx, feats.dtype), time_embedding(cn, t, ctx, feats.dtype)
        assert torch.equal(emb_u, emb_c)
        hu, _ = _down(unet, feats, emb_u, ctx)
        hc, _ = _down(cn, feats, emb_c, ctx)
    assert torch.equal(hu, hc)
    # the zero convs really start at zero
    assert all((q == 0).all() for q in cn.controlnet_mid_block.parameters())
