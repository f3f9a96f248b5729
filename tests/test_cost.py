"""Cost accounting (sim.commands.cost): parameters, FLOPs, memory and bytes from the configuration alone.

Fast tests use the ``tiny`` preset's whole table and the ``sd15`` preset's parameter counts
and client-side traces (meta device: seconds, no memory); the whole ``sd15`` table is a
slow test.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_base
from sim.commands import cost
from sim.commands.cost import MiB, build_meta_models, cost_table, markdown, param_counts, trace_step, wire_costs
from sim.core.wire import encode, record_nbytes
from strategies import SCHEMES, get_strategy

# SD1.5's published module sizes (diffusers' runwayml/stable-diffusion-v1-5 and lllyasviel ControlNet v1.1)
SD15_UNET = 859_520_964
SD15_CONTROLNET = 361_279_120
SD15_VAE = 83_653_863
SD15_CLIP_TEXT = 123_060_480

LAT = 4 * 64 * 64  # SD1.5 latent at 512 px
FEAT = 320 * 64 * 64  # UNet / ControlNet first-conv features
CTX = 77 * 768  # CLIP text context
NPY_HEADER_MAX = 256  # np.save's header for these ranks: 128 bytes (format 1.0 pads to 64)

# the paper's figures (Yao, arXiv 2409.08503; REFERENCE.md): SD1.5 at 512 px, fp32
PAPER_VANILLA_UP_MIB = 10.0  # per sample per step
PAPER_VANILLA_DOWN_MIB = 5.0
PAPER_NOGRAD_UP_MIB = 5.3  # the paper's "pp" mode
PAPER_FEDAVG_UP_GB = 1.4  # per client per round
PAPER_FEDAVG_CLIENT_PARAMS = 10**9  # ">1 B parameters on the device"


def _row(table, scheme):
    return next(r for r in table["rows"] if r["scheme"] == scheme)


@pytest.fixture(scope="module")
def tiny_table():
    return cost_table("tiny")


@pytest.fixture(scope="module")
def sd15():
    return build_meta_models("sd15")


@pytest.fixture(scope="module")
def sd15_client_traces(sd15):
    with cost._fused_attention("fused"):
        return {s: trace_step(s, sd15, server=False) for s in ("vanilla", "nograd", "fedavg")}


# ----------------------------------------------------------------------------- parameters
def test_sd15_meta_models_have_sd15_sizes(sd15):
    n = lambda m: sum(q.numel() for q in m.parameters())  # noqa: E731
    assert n(sd15.unet) == SD15_UNET
    assert n(sd15.controlnet) == SD15_CONTROLNET
    assert n(sd15.autoencoder) == SD15_VAE
    assert n(sd15.text_encoder) == SD15_CLIP_TEXT
    assert all(q.device.type == "meta" for q in sd15.unet.parameters())


def test_who_holds_and_trains_what_sd15(sd15):
    fed, van, nog = (param_counts(s, sd15) for s in ("fedavg", "vanilla", "nograd"))
    assert param_counts("splitfed", sd15) == van  # splitfed: vanilla's cut
    cn = sd15.controlnet
    head = sum(q.numel() for m in (cn.controlnet_cond_embedding, cn.conv_in) for q in m.parameters())
    assert fed["client_params"] == SD15_UNET + SD15_CONTROLNET + SD15_VAE + SD15_CLIP_TEXT > PAPER_FEDAVG_CLIENT_PARAMS
    assert fed["client_trainable_params"] == SD15_CONTROLNET and fed["server_trainable_params"] == 0
    assert nog["client_trainable_params"] == 0
    assert van["client_trainable_params"] == head
    unet_conv_in = sum(q.numel() for q in sd15.unet.conv_in.parameters())
    assert nog["client_params"] == SD15_VAE + SD15_CLIP_TEXT + unet_conv_in
    assert van["client_params"] == nog["client_params"] + head
    cond = sum(q.numel() for q in cn.controlnet_cond_embedding.parameters())
    assert van["server_trainable_params"] == SD15_CONTROLNET - head
    assert nog["server_trainable_params"] == SD15_CONTROLNET - cond  # hint block unused
    # vanilla's server: the UNet after conv_in + the ControlNet after its head; nograd's also
    # holds the ControlNet's conv_in (it trains it), not its hint block
    assert van["server_params"] == SD15_UNET - unet_conv_in + SD15_CONTROLNET - head
    assert nog["server_params"] == van["server_params"] + sum(q.numel() for q in cn.conv_in.parameters())


def test_tiny_meta_counts_equal_the_real_tiny_models(tiny_table):
    from sim.core.models import build_controlnet

    base = make_base("tiny")
    cn = build_controlnet(base.unet, base.preset)
    n = lambda m: sum(q.numel() for q in m.parameters())  # noqa: E731
    fed, van, nog = (_row(tiny_table, s) for s in ("fedavg", "vanilla", "nograd"))
    assert fed["client_modules"]["unet"] == n(base.unet)
    assert fed["client_trainable_params"] == n(cn)
    assert van["client_trainable_params"] == n(cn.controlnet_cond_embedding) + n(cn.conv_in)
    assert nog["client_trainable_params"] == 0 and nog["client_flops_backward"] == 0
    assert fed["client_modules"]["text_encoder"] == 22_713_216  # all-MiniLM-L6-v2


# ----------------------------------------------------------------------------- bytes
def test_sd15_bytes_per_sample_are_the_wire_fields_shapes(sd15, sd15_client_traces):
    nog = wire_costs("nograd", sd15, sd15_client_traces["nograd"].up, sd15_client_traces["nograd"].down)
    van = wire_costs("vanilla", sd15, sd15_client_traces["vanilla"].up, sd15_client_traces["vanilla"].down)
    # control_input (latent) + unet_features + t (int64) + noise (latent) + context, fp32
    assert nog["up_bytes_per_sample"] == LAT * 4 + FEAT * 4 + 8 + LAT * 4 + CTX * 4 == 5_610_504
    assert nog["up_bytes_per_sample_fp16"] == LAT * 2 + FEAT * 2 + 8 + LAT * 4 + CTX * 4  # fp16 wire: features only
    assert nog["up_bytes_per_sample_all_fp16"] == LAT * 2 + FEAT * 2 + 8 + LAT * 2 + CTX * 2
    assert nog["down_bytes_per_sample"] == 0 and nog["down_message_bytes"] == 8  # the request's k
    assert van["up_bytes_per_sample"] == 2 * FEAT * 4 + 8 + LAT * 4 + CTX * 4
    assert van["down_bytes_per_sample"] == FEAT * 4 == 5 * MiB
    assert van["turn_head_payload"] == 4 * (param_counts("vanilla", sd15)["client_trainable_params"])
    # the paper's figures, within 5%: vanilla ~10 MiB up, ~5 MiB down; nograd ("pp") ~5.3 MiB up, nothing down
    assert van["up_bytes_per_sample"] / MiB == pytest.approx(PAPER_VANILLA_UP_MIB, rel=0.05)
    assert van["down_bytes_per_sample"] / MiB == pytest.approx(PAPER_VANILLA_DOWN_MIB, rel=0.05)
    assert nog["up_bytes_per_sample"] / MiB == pytest.approx(PAPER_NOGRAD_UP_MIB, rel=0.05)
    spf = wire_costs("splitfed", sd15, sd15_client_traces["vanilla"].up, sd15_client_traces["vanilla"].down)
    assert spf["up_bytes_per_sample"] == van["up_bytes_per_sample"]  # vanilla's cut, vanilla's messages
    assert spf["down_bytes_per_sample"] == van["down_bytes_per_sample"]


def test_sd15_fedavg_round_is_the_controlnet_in_fp32(sd15):
    fed = wire_costs("fedavg", sd15)
    n_tensors = len(sd15.controlnet.state_dict())
    assert fed["round_up_payload"] == fed["round_down_payload"] == 4 * SD15_CONTROLNET
    assert 0 < fed["round_up_message"] - fed["round_up_payload"] <= NPY_HEADER_MAX * n_tensors + 64
    assert fed["round_up_payload"] / 1e9 == pytest.approx(PAPER_FEDAVG_UP_GB, rel=0.05)


def test_tiny_analytic_bytes_equal_record_nbytes_of_real_messages(tiny_table):
    """The analytic counts against what sim.core.wire.record_nbytes measures on messages the real
    clients build (tiny preset, batch 1, K = 1)."""
    from sim.core.models import build_controlnet, ddpm_scheduler
    from strategies.base import ClientData, ClientEnv, TrainSettings
    from strategies.fedavg import FitRes
    from strategies.nograd import FeaturesRequest, NoGradClient
    from strategies.vanilla import ControlHead, VanillaClient, VanillaRequest

    base = make_base("tiny")
    cn = build_controlnet(base.unet, base.preset)
    s = base.preset.image_size
    g = torch.Generator().manual_seed(0)
    data = ClientData(torch.rand(4, 3, s, s, generator=g) * 2 - 1, torch.rand(4, 3, s, s, generator=g),
                      ["a red disc"] * 4)
    env = ClientEnv(base, ddpm_scheduler(base.preset), TrainSettings(lr=1e-4, steps=1, local_steps=1, batch_size=1),
                    data, 0, cn)
    nog, van, fed = (_row(tiny_table, x) for x in ("nograd", "vanilla", "fedavg"))

    features = encode(NoGradClient(0, env).serve(FeaturesRequest(k=1)))
    assert record_nbytes(features) == nog["up_message_bytes"]
    assert 0 < nog["up_message_bytes"] - nog["up_bytes_per_sample"] <= NPY_HEADER_MAX * 5
    assert record_nbytes(encode(FeaturesRequest(k=1))) == nog["down_message_bytes"]

    client = VanillaClient(0, env)
    reply = client.serve(VanillaRequest(head=ControlHead(cn).state_dict()))
    assert record_nbytes(encode(reply)) == van["up_message_bytes"]
    grad = VanillaRequest(control_features_grad=torch.zeros_like(reply.control_features))
    assert record_nbytes(encode(grad)) == van["down_message_bytes"]
    assert van["down_bytes_per_sample"] == reply.control_features.numel() * 4

    res = FitRes(arrays=dict(cn.state_dict()), num_examples=4, losses=[0.5])
    assert record_nbytes(encode(res)) == fed["round_up_message"]
    assert fed["round_up_payload"] == 4 * sum(v.numel() for v in cn.state_dict().values())


# ----------------------------------------------------------------------------- FLOPs and memory
def test_tiny_flops_and_memory_order_the_schemes(tiny_table):
    fed, van, nog = (_row(tiny_table, s) for s in ("fedavg", "vanilla", "nograd"))
    # tiny has no VAE (identity autoencoder): the only one-time encoding is the prompt's
    assert nog["client_flops"] * 100 < fed["client_flops"]
    assert nog["client_flops"] < van["client_flops"] < fed["client_flops"]
    assert fed["client_flops_once_per_record"] == nog["client_flops_once_per_record"] == fed["client_flops_text"] > 0
    assert fed["client_flops_uncached"] == fed["client_flops"] + fed["client_flops_once_per_record"]
    assert fed["client_flops_backward"] > 0 and van["client_flops_backward"] > 0
    assert nog["server_flops"] > van["server_flops"] > 0  # nograd's server also runs (and trains) conv_in
    assert fed["server_flops"] == 0
    peak = [r["client_peak_activation_bytes"] for r in (nog, van, fed)]
    assert peak == sorted(peak) and len(set(peak)) == 3
    assert van["client_model_state_bytes"] > nog["client_model_state_bytes"]  # the head + its grad and AdamW state


def test_sd15_client_flops_split_schemes(sd15_client_traces):
    van, nog, fed = (sd15_client_traces[s] for s in ("vanilla", "nograd", "fedavg"))
    # once per record, nograd's client VAE-encodes target and hint (~1.1 TFLOP each at 512 px) ...
    assert nog.client_flops_once_per_record > 2e12 and nog.client_flops_backward == 0
    assert nog.client_flops_once_per_record > 1.9 * van.client_flops_once_per_record  # vanilla: the target only
    # ... and from the cache, all it computes per step is the UNet's first conv
    unet_conv_in = 2 * 320 * 4 * 9 * 64 * 64  # 2 FLOPs per MAC, no bias MACs
    assert nog.client_flops == unet_conv_in
    assert van.client_flops > 10 * unet_conv_in  # the head runs twice + backward
    # the paper's point, as the code runs: the nograd client computes < 5% of a FedAvg client per step
    assert nog.client_flops <= 0.05 * fed.client_flops and fed.client_flops > 2e12
    assert 300 * MiB < nog.client_peak_activation_bytes < 2048 * MiB  # the one-time VAE encoding at 512 px
    assert nog.client_peak_activation_bytes_step < 16 * MiB  # the step itself: conv_in on cached latents


def test_peak_tracker_counts_live_storages_exactly():
    with cost._PeakLive(set()) as mem:
        a = torch.empty(MiB // 4, device="meta")  # 1 MiB
        b = a * 2  # 2 MiB live
        v = b.view(-1)  # a view: no new storage
        del a
        c = b + 1  # 2 MiB live again
        del b, v, c
        d = torch.empty(MiB // 4, device="meta")  # 1 MiB
    assert mem.peak == 2 * MiB and d is not None


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if get_strategy(s).cut.up])
def test_the_frozen_unet_counts_input_gradients_only(scheme, tiny_table):
    """The split server's traced step (the strategy's own trace_server): with the UNet frozen, as
    the cut has it, backward costs about one forward (the ControlNet's weight and input gradients,
    the UNet's input gradients from its mid/up blocks only); were the UNet trainable, the same
    trace would cost about two forwards. The table reports the frozen figure."""
    from torch.utils.flop_counter import FlopCounterMode

    cls = get_strategy(scheme)
    models = build_meta_models("tiny")
    with cost._fused_attention(tiny_table["attention"]):
        up = trace_step(scheme, models, server=False).up

    def server_step(trainable):
        cost._set_trainable(models, trainable)
        try:
            with cost._fused_attention(tiny_table["attention"]), FlopCounterMode(display=False) as f:
                forward = cls.trace_server(models, up, lambda: cost._flops(f))
                total = cost._flops(f)
        finally:
            cost._set_trainable(models, ())
        return forward, total - forward

    trainable = cls.cut.client_trainable + cls.cut.server_trainable  # as trace_step sets them
    fwd, bwd = server_step(trainable)
    fwd_thawed, bwd_thawed = server_step(trainable + ("unet",))
    assert fwd == fwd_thawed > 0  # the same forward either way
    assert bwd < 1.5 * fwd  # frozen UNet: no weight gradients, no down path
    assert bwd_thawed > 1.9 * fwd  # trainable UNet: weight + input gradients everywhere
    row = _row(tiny_table, scheme)
    assert row["server_flops_backward"] == bwd and row["server_flops"] == fwd + bwd


def test_table_is_json_and_renders(tiny_table):
    back = json.loads(json.dumps(tiny_table))
    assert back["preset"] == "tiny" and back["image_size"] == 32
    assert [r["scheme"] for r in back["rows"]] == list(SCHEMES) and back["notes"]
    # the reference the table carries is the paper's
    ref = back["reference"]
    assert (ref["vanilla_up_mib_per_sample"], ref["vanilla_down_mib_per_sample"], ref["nograd_up_mib_per_sample"],
            ref["fedavg_up_gb_per_round"], ref["fedavg_client_params_min"]) == (
        PAPER_VANILLA_UP_MIB, PAPER_VANILLA_DOWN_MIB, PAPER_NOGRAD_UP_MIB, PAPER_FEDAVG_UP_GB,
        PAPER_FEDAVG_CLIENT_PARAMS)
    md = markdown(tiny_table)
    for s in SCHEMES:
        assert md.count(f"| {s} |") == 2, s  # a row in each table
    assert md.count("\n|---") == 2
    assert "~1.4 GB up per round" in md and "~10 MiB up, ~5 MiB down" in md and "~5.3 MiB up" in md
    assert "MiB each way per turn" in md and "MiB each way per round" in md  # vanilla's head per turn, splitfed's per round


# ----------------------------------------------------------------------------- the whole sd15 table
@pytest.mark.slow
def test_sd15_table_against_the_paper():
    table = cost_table("sd15")
    fed, van, nog = (_row(table, s) for s in ("fedavg", "vanilla", "nograd"))
    assert table["image_size"] == 512 and table["latent_shape"] == [4, 64, 64]
    assert fed["client_params"] > PAPER_FEDAVG_CLIENT_PARAMS
    assert nog["client_flops"] * 1000 < fed["client_flops"]
    assert nog["client_flops"] <= 0.05 * fed["client_flops"]  # issue 15's criterion, as executed
    # the server does the split schemes' heavy lifting: about FedAvg's client step without encodings and head
    assert van["server_flops"] == pytest.approx(fed["client_flops"], rel=0.05)
    assert fed["client_peak_activation_bytes"] > 2 * nog["client_peak_activation_bytes"]
    assert fed["client_model_state_bytes"] > 10 * nog["client_model_state_bytes"]
    assert van["up_bytes_per_sample"] / MiB == pytest.approx(PAPER_VANILLA_UP_MIB, rel=0.05)
    assert van["down_bytes_per_sample"] / MiB == pytest.approx(PAPER_VANILLA_DOWN_MIB, rel=0.05)
    assert nog["up_bytes_per_sample"] / MiB == pytest.approx(PAPER_NOGRAD_UP_MIB, rel=0.05)
    assert nog["down_bytes_per_sample"] == 0
    assert fed["round_up_payload"] / 1e9 == pytest.approx(PAPER_FEDAVG_UP_GB, rel=0.05)
    spf = _row(table, "splitfed")
    assert spf["server_flops"] == van["server_flops"] and spf["up_bytes_per_sample"] == van["up_bytes_per_sample"]
    assert table["wall_s"] < 120


def test_image_size_sets_the_shapes():
    models = build_meta_models("tiny", image_size=64)
    tr = trace_step("nograd", models, server=False)
    assert tuple(tr.up["control_input"].shape) == (1, 3, 64, 64)
    assert tuple(tr.up["unet_features"].shape) == (1, 32, 64, 64)
    assert wire_costs("nograd", models, tr.up, tr.down)["up_bytes_per_sample"] == (
        3 * 64 * 64 * 4 * 2 + 32 * 64 * 64 * 4 + 8 + 16 * 384 * 4)
