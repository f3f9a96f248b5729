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


# ----------------------------------------------------------------------------- base-model folders
def test_a_missing_base_model_folder_fails_naming_it_without_any_hub_lookup(tmp_path, monkeypatch):
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("a model hub was asked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    for folder in (tmp_path / "nowhere", "runwayml/stable-diffusion-v1-5"):  # a path, and what looks like a hub id
        with pytest.raises(FileNotFoundError, match="no such local folder") as e:
            load_base("sd15", folder=folder)
        assert str(folder) in str(e.value)


def test_cli_exits_2_on_a_missing_base_model(tmp_path, capsys):
    from sim.commands.cli import main

    with pytest.raises(SystemExit) as e:
        main(["compare", "--preset", "smoke", "--set", "model=sd15", "--set", f"base-model={tmp_path / 'nowhere'}",
              "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from sd_folder import make_sd_folder

    return make_sd_folder(tmp_path_factory.mktemp("sd"))


def test_preset_and_folder_must_agree_checked_from_configs_alone(sd_folder):
    from sim.core.models import check_base_folder, committed_tiny_base
    from sim.engine.context import load_experiment

    with pytest.raises(ValueError, match="model='tiny'") as e:  # an SD folder without model=sd15
        check_base_folder("tiny", sd_folder)
    assert str(sd_folder) in str(e.value) and "model=sd15" in str(e.value)
    with pytest.raises(ValueError, match="model='sd15'") as e:  # the pixel-space tiny folder with model=sd15
        check_base_folder("sd15", committed_tiny_base())
    assert "tiny-base" in str(e.value)
    with pytest.raises(ValueError, match="model='tiny'"):  # the same, at config time (before any work)
        load_experiment("smoke", [f"base-model={sd_folder}"])
    assert check_base_folder("sd15", sd_folder).name == "sd15"
    assert load_experiment("smoke", ["model=sd15", f"base-model={sd_folder}"]).base_model == str(sd_folder)


def test_folder_with_mismatched_channels_is_refused_naming_both(sd_folder, tmp_path):
    import json
    import shutil

    from sim.core.models import check_base_folder

    bad = shutil.copytree(sd_folder, tmp_path / "bad")
    cfg = json.loads((bad / "vae" / "config.json").read_text())
    (bad / "vae" / "config.json").write_text(json.dumps({**cfg, "latent_channels": 8}))
    with pytest.raises(ValueError, match="latent_channels=8") as e:
        check_base_folder("sd15", bad)
    assert str(bad) in str(e.value) and "sd15" in str(e.value)


def test_the_folders_scheduler_sets_the_noise_schedule(sd_folder, tmp_path):
    import json
    import shutil

    from diffusers import DDPMScheduler

    from sim.core.models import check_base_folder, ddpm_scheduler

    folder = shutil.copytree(sd_folder, tmp_path / "sched")
    path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "beta_schedule": "linear", "beta_start": 0.0002, "beta_end": 0.03,
                                "num_train_timesteps": 500}))
    base = load_base("sd15", folder=folder)
    assert (base.preset.beta_schedule, base.preset.num_train_timesteps) == ("linear", 500)
    ours = ddpm_scheduler(base.preset).alphas_cumprod
    theirs = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True).alphas_cumprod
    assert torch.equal(ours, theirs)
    path.write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    with pytest.raises(ValueError, match="prediction_type='v_prediction'"):
        check_base_folder("sd15", folder)


def test_the_sd15_base_samples_at_the_chosen_resolution(sd_folder):
    from sim.core.models import get_preset

    base = load_base("sd15", folder=sd_folder, image_size=128)  # the folder's UNet says 64 px (8 latent)
    assert (base.preset.image_size, base.preset.latent_size) == (128, 16)
    assert base.unet.config.sample_size == 16 and base.unet.sample_size == 16  # the wire check's size, in step
    assert load_base("sd15", folder=sd_folder).unet.config.sample_size == 64  # no resolution: the preset's 512 px
    assert load_base("sd15", device="meta").preset.image_size == 512  # and the preset's own (cost, GPU check)
    assert get_preset("sd15").image_size == 512 and get_preset("sd15").at_resolution(0) is get_preset("sd15")
    assert get_preset("sd15").at_resolution(256).latent_size == 32
    with pytest.raises(ValueError, match="resolution=60 must be a positive multiple of 8"):
        get_preset("sd15").at_resolution(60)
    with pytest.raises(ValueError, match="model='tiny'"):
        get_preset("tiny").at_resolution(64)


def test_a_folder_whose_vae_downsamples_otherwise_is_refused(sd_folder, tmp_path):
    import json
    import shutil

    from sim.core.models import check_base_folder

    bad = shutil.copytree(sd_folder, tmp_path / "bad")
    cfg = json.loads((bad / "vae" / "config.json").read_text())
    (bad / "vae" / "config.json").write_text(json.dumps({**cfg, "block_out_channels": cfg["block_out_channels"][:3]}))
    with pytest.raises(ValueError, match="downsamples by 4") as e:
        check_base_folder("sd15", bad)
    assert str(bad) in str(e.value)
