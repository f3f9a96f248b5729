"""Every split forward equals diffusers' whole forward; vanilla cut gradients equal centralised ones."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import perturb_zero_convs, through_wire
from sim.core.cuts import MODELS, control_head, control_rest, nograd_control_input, unet_first_conv, unet_rest
from sim.core.models import build_controlnet
from strategies import SCHEMES, get_strategy


def _inputs(base, batch=2, seed=0):
    p = base.preset
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, p.latent_channels, p.latent_size, p.latent_size, generator=g)
    hint = torch.rand(batch, 3, p.image_size, p.image_size, generator=g)
    t = torch.tensor([3, 871][:batch])
    ctx = torch.randn(batch, p.max_tokens, p.cross_attention_dim, generator=g)
    return x, t, ctx, hint


def _whole(base, cn, x, t, ctx, hint, sample=None):
    down, mid = cn(sample if sample is not None else x, t, encoder_hidden_states=ctx, controlnet_cond=hint,
                   return_dict=False)
    return base.unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid).sample


@pytest.fixture(params=["tiny", "sd15-mini"])
def setup(request, tiny_base, sd15_mini_base):
    base = tiny_base if request.param == "tiny" else sd15_mini_base
    torch.manual_seed(0)
    cn = perturb_zero_convs(build_controlnet(base.unet, base.preset))
    return base, cn


@torch.no_grad()
def test_vanilla_and_fedavg_split_equals_whole(setup):
    base, cn = setup
    x, t, ctx, hint = _inputs(base)
    whole = _whole(base, cn, x, t, ctx, hint)
    # client half, then the wire (detached copies), then the server half
    sent = through_wire(dict(cf=control_head(cn, x, hint), uf=unet_first_conv(base.unet, x), t=t, ctx=ctx))
    down, mid = control_rest(cn, sent["cf"], sent["t"], sent["ctx"])
    split = unet_rest(base.unet, sent["uf"], sent["t"], sent["ctx"], down, mid)
    assert whole.abs().mean() > 1e-3  # a real signal, not zeros
    assert (split - whole).abs().max().item() <= 1e-6


@torch.no_grad()
def test_nograd_split_equals_whole(setup):
    """nograd's whole model: diffusers' ControlNet on h = E(hint) + x_t with the hint block switched off."""
    base, cn = setup
    x, t, ctx, hint = _inputs(base)
    h = nograd_control_input(base.autoencoder, x, hint)
    ref = copy.deepcopy(cn)
    ref.controlnet_cond_embedding.forward = lambda c: torch.zeros(())  # contributes nothing
    whole = _whole(base, ref, x, t, ctx, hint, sample=h)
    sent = through_wire(dict(h=h, uf=unet_first_conv(base.unet, x), t=t, ctx=ctx))
    down, mid = control_rest(cn, cn.conv_in(sent["h"]), sent["t"], sent["ctx"])
    split = unet_rest(base.unet, sent["uf"], sent["t"], sent["ctx"], down, mid)
    assert (split - whole).abs().max().item() <= 1e-6
    # and the hint really matters: a different hint changes the output
    h2 = nograd_control_input(base.autoencoder, x, torch.zeros_like(hint))
    down2, mid2 = control_rest(cn, cn.conv_in(h2), t, ctx)
    assert (unet_rest(base.unet, unet_first_conv(base.unet, x), t, ctx, down2, mid2) - split).abs().max() > 1e-4


def test_vanilla_cut_gradients_equal_centralised(setup):
    base, cn = setup
    x, t, ctx, hint = _inputs(base)
    noise = torch.randn_like(x)
    # centralised: one model, one backward
    central = copy.deepcopy(cn)
    loss = ((_whole(base, central, x, t, ctx, hint) - noise) ** 2).mean()
    loss.backward()
    # split: client head -> wire -> server rest; server returns the cut gradient; client applies it
    split = copy.deepcopy(cn)
    act = control_head(split, x, hint)
    sent = through_wire(dict(cf=act, uf=unet_first_conv(base.unet, x)))
    cf = sent["cf"].requires_grad_(True)
    down, mid = control_rest(split, cf, t, ctx)
    ((unet_rest(base.unet, sent["uf"], t, ctx, down, mid) - noise) ** 2).mean().backward()
    act.backward(through_wire({"g": cf.grad})["g"])
    for (name, pc), (_, ps) in zip(central.named_parameters(), split.named_parameters()):
        assert pc.grad is not None and ps.grad is not None, name
        assert (pc.grad - ps.grad).abs().max().item() <= 1e-5, name
    assert all(p.grad is None for p in base.unet.parameters())  # the frozen UNet got no gradient


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_cut_table_covers_every_module_once(scheme, tiny_base):
    cut = get_strategy(scheme).cut
    assert cut.scheme == scheme
    for entry in cut.client + cut.server + cut.unused:
        assert entry.partition(".")[0] in MODELS, entry
    cn = build_controlnet(tiny_base.unet, tiny_base.preset)
    names = {f"unet.{n}" for n, _ in tiny_base.unet.named_children()}
    names |= {f"controlnet.{n}" for n, _ in cn.named_children()}

    def expand(entries):
        out = set()
        for e in entries:
            out |= {n for n in names if n == e or n.startswith(e + ".")} if "." in e else \
                {n for n in names if n.startswith(e + ".")} | ({e} if e in ("autoencoder", "text_encoder") else set())
        return out

    client, server, unused = expand(cut.client), expand(cut.server), expand(cut.unused)
    assert not (client & server), client & server
    assert names <= client | server | unused, names - (client | server | unused)
    assert expand(cut.client_trainable) <= client and expand(cut.server_trainable) <= server
