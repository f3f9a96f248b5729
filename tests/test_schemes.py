"""Every registered scheme through the Flower apps on the in-process grid: what trains, what
stays frozen, what crosses, determinism. Scheme-generic checks are parametrised over the
registry (strategies.SCHEMES), so a new scheme gets them too."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_base, model_context, perturb_zero_convs, through_wire
from sim.core.cuts import controlled_eps, nograd_control_input
from sim.core.models import build_controlnet, ddpm_scheduler
from sim.core.wire import WireError
from sim.engine.client_app import client_app_for
from sim.engine.context import fingerprint
from sim.engine.grid import InProcessGrid, discover
from sim.engine.runner import run_strategy
from sim.engine.transcript import Transcript
from strategies import SCHEMES, get_strategy
from strategies.base import (ClientData, ClientEnv, TrainSettings, client_generator, composed_eps, sample_batch,
                             turn_schedule)

HEAD_SCHEMES = [n for n, c in SCHEMES.items() if c.client_part == "head"]  # vanilla, splitfed


def _clients(base, n_clients=2, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = base.preset.image_size
    out = []
    for c in range(n_clients):
        out.append(ClientData(torch.rand(n, 3, s, s, generator=g) * 2 - 1, torch.rand(n, 3, s, s, generator=g),
                              [f"a red circle on a {c} background"] * n))
    return out


def _envs(base, controlnet, settings, seed=0):
    sched = ddpm_scheduler(base.preset)
    return [ClientEnv(base, sched, settings, d, seed, controlnet) for d in _clients(base)]


def _run(scheme, base, controlnet, steps=4, local_steps=2, batch=2, lr=1e-3, seed=0, weight=1.0, keep=0,
         keep_optimizer=True, average_from=1.0):
    settings = TrainSettings(lr=lr, steps=steps, local_steps=local_steps, batch_size=batch, high_noise_weight=weight,
                             keep_optimizer=keep_optimizer, average_from=average_from)
    envs = _envs(base, controlnet, settings, seed)
    grid = InProcessGrid(client_app_for(envs), len(envs), {})
    ctx = model_context(base, controlnet, settings, seed, envs[0].scheduler)
    res = run_strategy(scheme, ctx, grid, discover(grid, len(envs)), Transcript(keep))
    return res, envs


@pytest.fixture(scope="module")
def base():
    return make_base("tiny", seed=3)


@pytest.fixture(scope="module")
def controlnet(base):
    torch.manual_seed(0)
    return build_controlnet(base.unet, base.preset)


def test_every_scheme_is_tested():
    assert {"fedavg", "vanilla", "nograd", "splitfed"} <= set(SCHEMES)
    assert set(HEAD_SCHEMES) == {"vanilla", "splitfed"}


def _whole(base, cn, x, t, ctx, hint, sample=None):
    """diffusers' own forward of the ControlNet and the UNet (no split)."""
    down, mid = cn(sample if sample is not None else x, t, encoder_hidden_states=ctx, controlnet_cond=hint,
                   return_dict=False)
    return base.unet(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid).sample


@pytest.mark.parametrize("scheme", list(SCHEMES))
@torch.no_grad()
def test_the_scheme_s_composed_model_equals_diffusers_whole_forward(scheme, base):
    """A scheme's cut-layer tensors, sent over the wire, give diffusers' whole forward: the standard
    ControlNet where the hint block reads the hint, diffusers' ControlNet on h = E(hint) + x_t with
    the hint block off where the cut leaves it unused (nograd)."""
    cls = get_strategy(scheme)
    torch.manual_seed(0)
    cn = perturb_zero_convs(build_controlnet(base.unet, base.preset))
    p = base.preset
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, p.latent_channels, p.latent_size, p.latent_size, generator=g)
    hint = torch.rand(2, 3, p.image_size, p.image_size, generator=g)
    t, ctx = torch.tensor([3, 871]), torch.randn(2, p.max_tokens, p.cross_attention_dim, generator=g)
    if "controlnet.controlnet_cond_embedding" in cls.cut.unused:
        ref = copy.deepcopy(cn)
        ref.controlnet_cond_embedding.forward = lambda c: torch.zeros(())  # contributes nothing
        whole = _whole(base, ref, x, t, ctx, hint, sample=nograd_control_input(base.autoencoder, x, hint))
    else:
        whole = _whole(base, cn, x, t, ctx, hint)
    assert whole.abs().mean() > 1e-3  # a real signal
    composed = composed_eps(cls, base, cn, x, t, ctx, hint)
    assert (composed - whole).abs().max().item() <= 1e-6
    control, feats = cls.cut_features(cn, base, x, hint)
    sent = through_wire(dict(control=control, feats=feats, t=t, ctx=ctx))
    split = controlled_eps(base.unet, cn, sent["control"], sent["feats"], sent["t"], sent["ctx"])
    assert (split - whole).abs().max().item() <= 1e-6
    # and the hint matters under every scheme
    other = composed_eps(cls, base, cn, x, t, ctx, torch.zeros_like(hint))
    assert (other - whole).abs().max().item() > 1e-4


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_frozen_parts_stay_bit_identical_and_controlnet_trains(scheme, base, controlnet):
    before = fingerprint(base.unet, base.autoencoder, base.text_encoder)
    cn_before = fingerprint(controlnet)
    res, _ = _run(scheme, base, controlnet, weight=20.0)
    assert fingerprint(base.unet, base.autoencoder, base.text_encoder) == before
    assert fingerprint(controlnet) == cn_before  # the shared initial copy is untouched
    assert fingerprint(res.controlnet) != cn_before  # the trained one moved
    assert res.steps == 4 and len(res.losses) == 4 and all(l > 0 for l in res.losses)


def test_nograd_client_has_nothing_to_train_and_gets_nothing_back(base, controlnet):
    res, envs = _run("nograd", base, controlnet)
    assert res.client_trainable_params == 0
    client = get_strategy("nograd").client_class(0, envs[0])
    client.serve(client.request_type(k=2))
    assert not any(isinstance(v, torch.optim.Optimizer) for v in vars(client).values())
    assert set(client.get_state()) == {"generator", "defense-generator"}  # all a nograd client carries: its RNGs
    t = res.transcript
    # server -> client carries only the request (k: one number): 8 bytes per message, no tensor
    assert t.bytes_down == 8 * t.messages
    assert t.bytes_up > 1000 * t.bytes_down
    assert t.messages == 2  # one message per turn of local-steps batches, not one per step


@pytest.mark.parametrize("scheme", HEAD_SCHEMES)
def test_the_head_gets_the_gradient_of_the_activation_the_server_used(scheme, base):
    """One vanilla (or splitfed) step == one centralised step of the head on the same batch, t and noise.

    The zero convs are perturbed first: at ControlNet's init they make the cut gradient
    exactly 0, and the test would then only see AdamW's weight decay.
    """
    torch.manual_seed(0)
    controlnet = perturb_zero_convs(build_controlnet(base.unet, base.preset))
    res, _ = _run(scheme, base, controlnet, steps=1, local_steps=1, lr=1e-2)
    # recompute centrally: the same client generator gives the same batch, t and noise
    central = copy.deepcopy(controlnet).train()
    b = sample_batch(base, ddpm_scheduler(base.preset), _clients(base)[0], 2, client_generator(0, 0))
    eps_hat = composed_eps(get_strategy(scheme), base, central, b.x_t, b.t, b.context, b.hint)
    ((eps_hat - b.noise) ** 2).mean().backward()
    assert central.conv_in.weight.grad.abs().max() > 1e-6  # a real gradient crossed the cut
    opt = torch.optim.AdamW(list(central.controlnet_cond_embedding.parameters()) + list(central.conv_in.parameters()),
                            lr=1e-2)
    opt.step()
    trained = res.controlnet
    for name in ("controlnet_cond_embedding", "conv_in"):
        for (n, pc), (_, pt) in zip(getattr(central, name).named_parameters(), getattr(trained, name).named_parameters()):
            assert (pc - pt).abs().max() <= 1e-5, f"{name}.{n}"
    # and it moved by the gradient, not only by weight decay: compare with a decay-only step
    decay_only = controlnet.conv_in.weight * (1 - 1e-2 * 0.01)
    assert (trained.conv_in.weight - decay_only).abs().max() > 1e-4
    assert res.transcript.bytes_down > 0 and res.client_trainable_params > 0


def test_same_seed_same_losses_and_same_batches_across_schemes(base, controlnet):
    r1, _ = _run("nograd", base, controlnet)
    r2, _ = _run("nograd", base, controlnet)
    assert r1.losses == r2.losses
    d = _clients(base)[1]
    s = ddpm_scheduler(base.preset)
    b1 = sample_batch(base, s, d, 2, client_generator(0, 1))
    b2 = sample_batch(base, s, d, 2, client_generator(0, 1))
    assert torch.equal(b1.x_t, b2.x_t) and torch.equal(b1.t, b2.t)


def test_turn_schedule_covers_the_budget():
    turns = turn_schedule(7, 3, 2)
    assert turns == [(0, 2), (1, 2), (2, 2), (0, 1)]
    assert sum(k for _, k in turns) == 7


def test_high_noise_weights_are_one_at_low_noise_and_capped_at_high_noise(base):
    from sim.core.diffusion import high_noise_weights

    s = ddpm_scheduler(base.preset)
    w = high_noise_weights(s, torch.tensor([0, 100, 500, 900, 999]), 20.0)
    assert w[0] == 1 and w[1] == 1 and w[-1] == 20  # SNR >> 1 -> 1; SNR ~ 0 -> the cap
    assert 1 <= w[2] <= w[3] <= w[4]
    assert (high_noise_weights(s, torch.tensor([999]), 1.0) == 1).all()


def test_prompt_dropout_replaces_prompts_with_the_empty_prompt(base):
    d = _clients(base)[0]
    s = ddpm_scheduler(base.preset)
    empty = base.encode_prompts([""])[0]
    all_dropped = sample_batch(base, s, d, 4, client_generator(0, 0), prompt_dropout=1.0)
    none_dropped = sample_batch(base, s, d, 4, client_generator(0, 0), prompt_dropout=0.0)
    assert all(torch.equal(c, empty) for c in all_dropped.context)
    assert not any(torch.equal(c, empty) for c in none_dropped.context)
    assert torch.equal(all_dropped.x_t, none_dropped.x_t)  # same images, t and noise either way


@pytest.mark.parametrize("scheme,keep", [(s, True) for s in SCHEMES] + [("fedavg", False)])
def test_flower_path_equals_a_bare_pytorch_loop(scheme, keep, base, controlnet):
    """The apps over the in-process grid compute what a plain loop (the scheme's own ``bare``) computes:
    same batches, same losses (FedAvg with stateful and with stateless clients)."""
    settings = TrainSettings(lr=1e-3, steps=6, local_steps=2, batch_size=2, high_noise_weight=20.0, keep_optimizer=keep)
    res, envs = _run(scheme, base, controlnet, steps=6, local_steps=2, weight=20.0, keep_optimizer=keep)
    bare = get_strategy(scheme).bare(_envs(base, controlnet, settings), controlnet, settings, turn_schedule(6, 2, 2))
    assert len(bare) == len(res.losses) == 6
    assert max(abs(a - b) for a, b in zip(bare, res.losses)) <= 1e-5


def test_a_failing_client_stops_the_run_naming_it(base, controlnet):
    settings = TrainSettings(lr=1e-3, steps=2, local_steps=1, batch_size=2)
    envs = _envs(base, controlnet, settings)
    envs[1].data.condition[:] = float("nan")  # client 1's hints are corrupt: its features will be NaN
    grid = InProcessGrid(client_app_for(envs), 2, {})
    ctx = model_context(base, controlnet, settings, 0, envs[0].scheduler)
    with pytest.raises(WireError, match="NaN") as err:  # the server refuses the corrupt payload
        run_strategy("nograd", ctx, grid, discover(grid, 2))
    message = str(err.value)
    assert "client 1 " in message and "client 0 " not in message  # the failing client's partition id
    assert "query.nograd" in message  # and the message type it failed on


@pytest.mark.parametrize("scheme", HEAD_SCHEMES)
def test_transcript_keeps_what_the_server_saw(scheme, base, controlnet):
    res, _ = _run(scheme, base, controlnet, keep=3)
    t = res.transcript
    assert len(t.seen) == 3 and t.messages == 6  # 2 clients x (2 steps + 1 head return)
    stat, down, up = t.seen[0]
    assert stat.client == 0 and stat.message_type == get_strategy(scheme).message_type == f"query.{scheme}"
    assert "head" in down.array_records and "tensors" in up.array_records


@pytest.mark.parametrize("keep", [False, True])
def test_fedavg_client_optimizer_state_between_rounds(base, controlnet, keep):
    """fedavg-keep-optimizer: the client's AdamW moments survive the message boundary through its
    saved state (Flower's context.state), so round 2 continues round 1's step count; without it
    every round starts a fresh optimizer and nothing of it is saved."""
    from strategies.fedavg import FedAvgClient, FitIns

    settings = TrainSettings(lr=1e-3, steps=4, local_steps=2, batch_size=2, keep_optimizer=keep)
    env = _envs(base, controlnet, settings)[0]
    first = FedAvgClient(0, env)
    res = first.serve(FitIns(dict(controlnet.state_dict()), 1, 2))
    state = first.get_state()
    second = FedAvgClient(0, env)  # a fresh object per message, as under Flower
    second.set_state(state)
    second.serve(FitIns(res.arrays, 2, 2))
    steps = {k: float(v) for k, v in second.get_state().items() if k.endswith(".step")}
    if keep:
        assert steps and set(steps.values()) == {4.0}  # 2 local steps in each of 2 rounds
    else:
        assert not steps and not any(k.startswith("opt.") for k in state)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_average_from_releases_the_mean_of_the_turn_ends_and_trains_the_same(scheme, base, controlnet):
    """average-from=0: the released ControlNet is the mean of the model at the end of every turn
    (FedAvg and SplitFed: every round); training is unchanged. A run of fewer steps is a prefix of the
    same trajectory (the batch, t and noise streams do not depend on the budget), so the last weights
    of the 1-, 2-, ... turn runs are the snapshots the average must hold."""
    per_unit = 2 if SCHEMES[scheme].concurrency in ("rounds", "parallel-split") else 1  # steps per turn / round
    averaged, _ = _run(scheme, base, controlnet, steps=4, local_steps=1, average_from=0.0)
    snapshots = [_run(scheme, base, controlnet, steps=s, local_steps=1)[0] for s in range(per_unit, 5, per_unit)]
    last = snapshots[-1]
    assert averaged.losses == last.losses  # the same training
    states = [r.controlnet.state_dict() for r in snapshots]
    mean = {k: sum(st[k] for st in states) / len(states) for k in states[0]}
    got = averaged.controlnet.state_dict()
    assert all(torch.allclose(got[k], mean[k], atol=1e-6) for k in mean)
    moved = [k for k in mean if not torch.equal(states[0][k], states[-1][k])]
    assert moved and any(not torch.allclose(got[k], last.controlnet.state_dict()[k], atol=1e-6) for k in moved)
    half, _ = _run(scheme, base, controlnet, steps=4, local_steps=1, average_from=0.5)  # the last half of the units
    tail = states[len(states) // 2:]
    assert all(torch.allclose(half.controlnet.state_dict()[k], sum(st[k] for st in tail) / len(tail), atol=1e-6)
               for k in mean)
