"""The baseline defenses: noise, local-dp, patch-shuffle, mixup, nopeek (split) and dp-sgd,
server-dp (FedAvg): each does what its parameters say, refuses the schemes it cannot serve,
and (slow) a whole run works for each hook type."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from conftest import perturb_zero_convs
from defenses import DefenseStack, HookContext, accounting, make_defense
from defenses.dp_sgd import clipped_gradient_sum, gdp_clt_epsilon, rdp_epsilon
from defenses.local_dp import clip_per_sample
from defenses.mixup import mix_batch
from defenses.nopeek import distance_correlation
from defenses.patch_shuffle import shuffle_patches
from strategies import SCHEMES, get_strategy
from strategies.base import private_generator

CLIENT_SEED = 9  # the clients' client-side seed (the test provisions them, as the harness does)
NEW = ("noise", "local-dp", "patch-shuffle", "mixup", "nopeek", "dp-sgd", "server-dp")


@pytest.fixture(scope="module")
def models(tiny_base):
    """The session's tiny base model and a ControlNet whose zero convs are perturbed (real residuals)."""
    from sim.core.models import build_controlnet

    torch.manual_seed(0)
    return tiny_base, perturb_zero_convs(build_controlnet(tiny_base.unet, tiny_base.preset))


def _ctx(seed: int = CLIENT_SEED) -> HookContext:
    """Client 0's hook context: its private generator, from its client seed."""
    return HookContext(torch.zeros(4, dtype=torch.long), None, 0, private_generator(seed, 0))


def _x(shape=(4, 8, 32, 32), seed=1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3 + 1


# ----------------------------------------------------------------------------- schemes
@pytest.mark.parametrize("name", NEW)
def test_each_defense_refuses_the_schemes_it_cannot_serve_with_the_reason(name):
    from defenses import list_defenses

    d = make_defense(name)
    assert d.why_not and d.threat_model and (type(d).__doc__ or "").strip()
    (row,) = [r for r in list_defenses(schemes=SCHEMES.values()) if r["name"] == name]
    served = []
    for scheme, cls in SCHEMES.items():
        if set(d.hooks) <= set(cls.hooks):  # applicability: every hook it acts at is offered
            assert d.not_applicable(cls) is None
            DefenseStack([name], cls)
            served.append(scheme)
        else:
            assert d.why_not in d.not_applicable(cls)
            with pytest.raises(ValueError, match=f"'{name}'.*{scheme}.*{re.escape(d.why_not[:20])}"):
                DefenseStack([name], cls)
    assert served and row["schemes"] == served and set(row["not_applicable"]) == set(SCHEMES) - set(served)
    split = {"vanilla", "nograd", "splitfed"}  # feature-side defenses serve the split schemes, fl ones fedavg
    assert set(served) == {"fedavg"} if d.hooks[0].startswith("fl-") else set(served) <= split


@pytest.mark.parametrize("spec, bad", [("noise:std=-1", "std"), ("noise:branch=left", "branch"),
                                       ("local-dp:epsilon=0", "epsilon"), ("local-dp:clip=-1", "clip"),
                                       ("local-dp:delta=1", "delta"), ("patch-shuffle:patch=0", "patch"),
                                       ("mixup:alpha=0", "alpha"), ("nopeek:alpha=-1", "alpha"),
                                       ("dp-sgd:clip=0", "clip"), ("dp-sgd:noise-multiplier=-1", "noise-multiplier"),
                                       ("server-dp:clipping-norm=0", "clipping-norm"),
                                       ("server-dp:noise-multiplier=-0.5", "noise-multiplier")])
def test_bad_parameters_fail_naming_the_defense_and_parameter(spec, bad):
    with pytest.raises(ValueError, match=rf"{spec.split(':')[0]}.*{bad}"):
        make_defense(spec)


# ----------------------------------------------------------------------------- noise
@pytest.mark.parametrize("branch", ["control", "unet", "both"])
def test_noise_std_is_the_standard_deviation_on_the_chosen_branch(branch):
    d = make_defense(f"noise:std=0.5,branch={branch}")
    ctx, x = _ctx(), _x()
    for name in ("control", "unet"):
        sent = d.feature(name, x, ctx)
        if branch in (name, "both"):
            assert (sent - x).std().item() == pytest.approx(0.5, rel=0.05)
            assert abs((sent - x).mean().item()) < 0.02
        else:
            assert torch.equal(sent, x)
    assert d.at_inference and not d.accounted


def test_noise_is_fresh_per_batch_and_replayable_from_the_generator_state():
    d, x = make_defense("noise:std=1"), _x()
    ctx = _ctx()
    state = ctx.gen.get_state()
    a, b = d.feature("control", x, ctx), d.feature("control", x, ctx)
    assert not torch.equal(a, b)
    ctx.gen.set_state(state)
    assert torch.equal(d.feature("control", x, ctx), a)  # the vanilla client replays it for the backward pass


# ----------------------------------------------------------------------------- local-dp
def test_local_dp_clips_each_sample_and_adds_noise_of_multiplier_times_2c():
    x = _x()
    x[1] *= 1e-3  # one sample already inside the ball
    clipped = clip_per_sample(x, 10.0)
    norms = clipped.flatten(1).norm(dim=1)
    assert norms.max() <= 10.0 + 1e-4 and norms[0] == pytest.approx(10.0, rel=1e-5)
    assert torch.allclose(clipped[1], x[1])  # unchanged inside the ball
    d = make_defense("local-dp:epsilon=4,delta=1e-6,clip=10")
    sent = d.feature("control", x, _ctx())
    assert d.sigma(10.0) == pytest.approx(accounting.multiplier_for(4, 1e-6) * 20)
    assert (sent - clipped).std().item() == pytest.approx(d.sigma(10.0), rel=0.05)
    assert torch.equal(d.feature("unet", x, _ctx()), x)  # the control branch only


def test_local_dp_default_clip_is_sqrt_of_the_feature_size_and_accounting_round_trips():
    d = make_defense("local-dp:epsilon=2,delta=1e-5")
    d.feature("control", _x(), _ctx())
    assert d.clip == pytest.approx(math.sqrt(8 * 32 * 32))
    a = d.accounting(None, releases=1)
    assert a["sensitivity"] == pytest.approx(2 * d.clip)
    assert accounting.epsilon_for(a["noise_multiplier"], a["delta"]) == pytest.approx(2.0, rel=1e-3)
    assert a["epsilon_composed"] == pytest.approx(2.0, rel=1e-3)
    assert d.accounting(None, releases=10)["epsilon_composed"] > 2.0 * 2
    assert d.describe(scheduler=object())["accounting"]["epsilon_per_release"] == 2.0


# ----------------------------------------------------------------------------- patch-shuffle
def test_patch_shuffle_keeps_the_values_and_the_patches_but_moves_them():
    x = _x((2, 3, 16, 16))
    y = shuffle_patches(x, 4, torch.Generator().manual_seed(0))
    assert torch.equal(x.flatten(1).sort(dim=1).values, y.flatten(1).sort(dim=1).values)  # same multiset per sample
    assert (x != y).float().mean() > 0.5  # positions changed
    tiles = lambda t: t.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(t.shape[0], 16, -1)
    for i in range(2):  # every output patch is an input patch of the same sample, each used once
        tx, ty = tiles(x)[i], tiles(y)[i]
        match = (ty[:, None] == tx[None]).all(-1)
        assert match.sum(1).eq(1).all() and match.sum(0).eq(1).all()
    with pytest.raises(ValueError, match="patch-shuffle.*multiple"):
        shuffle_patches(_x((1, 3, 10, 10)), 4, torch.Generator())
    d = make_defense("patch-shuffle")
    assert torch.equal(d.feature("unet", x, _ctx()), x)


# ----------------------------------------------------------------------------- mixup
def test_mixup_is_a_convex_combination_with_another_sample():
    x = _x((6, 3, 8, 8))
    y, lam, partner = mix_batch(x, 0.4, torch.Generator().manual_seed(3))
    assert ((lam >= 0) & (lam <= 1)).all() and (partner != torch.arange(6)).all()
    expect = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[partner]
    assert torch.allclose(y, expect, atol=1e-6)
    lo, hi = torch.minimum(x, x[partner]), torch.maximum(x, x[partner])
    assert ((y >= lo - 1e-5) & (y <= hi + 1e-5)).all()
    _, lam_d, _ = mix_batch(x, 0.4, torch.Generator().manual_seed(3), dominant=True)
    assert (lam_d >= 0.5).all()
    d = make_defense("mixup")
    assert torch.equal(d.feature("unet", x, _ctx()), x) and not d.at_inference
    assert torch.equal(mix_batch(x[:1], 0.4, torch.Generator())[0], x[:1])  # nothing to mix with


# ----------------------------------------------------------------------------- nopeek
def test_distance_correlation_is_one_for_dependence_and_small_for_independence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g)
    assert distance_correlation(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert distance_correlation(x, 3 * x + 2).item() == pytest.approx(1.0, abs=1e-6)
    indep = distance_correlation(x, torch.randn(400, 3, generator=g)).item()
    nonlin = distance_correlation(x, x ** 2).item()  # uncorrelated, but dependent
    noisy = distance_correlation(x, x + torch.randn(400, 2, generator=g)).item()
    assert indep < 0.2 < 0.35 < nonlin < noisy < 1


def test_nopeek_changes_the_vanilla_clients_head_gradient(models):
    from sim.core.models import ddpm_scheduler
    from strategies.base import ClientData, ClientEnv, TrainSettings
    from strategies.vanilla import ControlHead, VanillaClient, VanillaRequest

    tiny_base, cn = models
    s = tiny_base.preset.image_size
    g = torch.Generator().manual_seed(0)
    data = ClientData(torch.rand(6, 3, s, s, generator=g) * 2 - 1, torch.rand(6, 3, s, s, generator=g), ["a"] * 6)
    grads = {}
    for specs in ((), ("nopeek:alpha=1",)):
        settings = TrainSettings(lr=1e-3, steps=1, local_steps=1, batch_size=4, defenses=specs)
        client = VanillaClient(0, ClientEnv(tiny_base, ddpm_scheduler(tiny_base.preset), settings, data, 0, cn,
                                            CLIENT_SEED))
        reply = client.serve(VanillaRequest(head=ControlHead(cn).state_dict()))
        cut_grad = torch.full_like(reply.control_features, 1e-4)
        client.serve(VanillaRequest(control_features_grad=cut_grad, want_batch=False))
        grads[specs] = client.head.conv_in.weight.grad.clone()
    assert not torch.allclose(grads[()], grads[("nopeek:alpha=1",)])
    # a vanilla client without a client seed refuses to run defenses, as every split client does
    settings = TrainSettings(lr=1e-3, steps=1, local_steps=1, batch_size=4, defenses=("nopeek:alpha=1",))
    client = VanillaClient(0, ClientEnv(tiny_base, ddpm_scheduler(tiny_base.preset), settings, data, 0, cn))
    with pytest.raises(RuntimeError, match="without a client-seed"):
        client.serve(VanillaRequest(head=ControlHead(cn).state_dict()))


# ----------------------------------------------------------------------------- dp-sgd
def test_dp_sgd_clips_each_record_groups_duplicates_and_adds_noise():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    x = torch.randn(4, 5)
    x[0] *= 100  # one record with a huge gradient
    params = list(lin.parameters())
    losses = lambda: (lin(x) ** 2).sum(1)
    total, norms = clipped_gradient_sum(losses(), params, torch.arange(4), 1.0)
    assert max(norms) > 10 and sum(float(t.pow(2).sum()) for t in total) ** 0.5 <= 4.0 + 1e-5
    for i in range(4):  # each record's contribution is its own gradient clipped to norm <= 1
        one, (n,) = clipped_gradient_sum(losses()[i:i + 1], params, torch.zeros(1), 1.0)
        assert n == pytest.approx(norms[i], rel=1e-5)
        assert sum(float(t.pow(2).sum()) for t in one) ** 0.5 == pytest.approx(min(1.0, n), rel=1e-5)
    # a record drawn twice is one record: its occurrences are summed, then clipped once
    _, dup_norms = clipped_gradient_sum(losses(), params, torch.tensor([0, 1, 1, 2]), 1.0)
    assert len(dup_norms) == 3
    # private_step: no noise -> the mean of clipped gradients; with noise -> plus N(0, (s C / B)^2)
    base_state = {k: v.clone() for k, v in lin.state_dict().items()}
    steps = {}
    for s in (0.0, 2.0):
        lin.load_state_dict(base_state)
        d = make_defense(f"dp-sgd:clip=1,noise-multiplier={s}")
        opt = torch.optim.SGD(lin.parameters(), lr=1.0)
        d.private_step(lin, losses, opt, torch.Generator().manual_seed(1), dataset_size=40)
        steps[s] = [p.grad.clone() for p in params]
        assert d.sample_rate == pytest.approx(0.1)
    for g0, t in zip(steps[0.0], total):
        assert torch.allclose(g0, t / 4, atol=1e-6)
    assert not torch.allclose(steps[0.0][0], steps[2.0][0])


def test_dp_sgd_noise_std_is_multiplier_times_clip_over_batch():
    big = torch.nn.Linear(200, 100)
    x = torch.randn(4, 200)
    d = make_defense("dp-sgd:clip=0.5,noise-multiplier=3")
    noiseless, _ = clipped_gradient_sum((big(x) ** 2).sum(1), list(big.parameters()), torch.arange(4), 0.5)
    opt = torch.optim.SGD(big.parameters(), lr=0.0)
    d.private_step(big, lambda: (big(x) ** 2).sum(1), opt, torch.Generator().manual_seed(2))
    noise = big.weight.grad - noiseless[0] / 4
    assert noise.std().item() == pytest.approx(3 * 0.5 / 4, rel=0.05)


def test_per_sample_gradients_of_the_batched_controlnet_equal_single_sample_ones(models):
    """The diffusers modules normalise per sample, so one batched forward gives per-sample gradients."""
    from strategies.base import composed_eps

    tiny_base, cn = models
    s, p = tiny_base.preset.image_size, tiny_base.preset
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, p.latent_channels, p.latent_size, p.latent_size, generator=g)
    hint, t = torch.rand(2, 3, s, s, generator=g), torch.tensor([10, 700])
    ctx = tiny_base.encode_prompts(["a red circle", "a blue square"])
    params = [q for q in cn.parameters() if q.requires_grad]
    loss = lambda sl: composed_eps(get_strategy("fedavg"), tiny_base, cn, x_t[sl], t[sl], ctx[sl],
                                   hint[sl]).pow(2).flatten(1).mean(1)
    batched = torch.autograd.grad(loss(slice(0, 2))[1], params, allow_unused=True)
    single = torch.autograd.grad(loss(slice(1, 2))[0], params, allow_unused=True)
    for a, b in zip(batched, single):
        if a is None or b is None:
            assert a is None and b is None
        else:
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_rdp_accountant_matches_known_regimes():
    # no subsampling: RDP of the Gaussian is alpha / (2 s^2); its epsilon is a little above the exact GM's
    exact = accounting.epsilon_for(1.0, 1e-5)
    eps1, _ = rdp_epsilon(1.0, 1.0, 1, 1e-5)
    assert exact < eps1 < 1.2 * exact
    # the MNIST DP-SGD setting (Abadi et al.): q = 256/60000, sigma = 1.1, 60 epochs -> epsilon ~ 2.5-3
    q, steps = 256 / 60000, 60 * 60000 // 256
    eps, _ = rdp_epsilon(q, 1.1, steps, 1e-5)
    assert 2.3 < eps < 3.1
    assert gdp_clt_epsilon(q, 1.1, steps, 1e-5) == pytest.approx(eps, rel=0.2)
    assert rdp_epsilon(q, 1.1, 2 * steps, 1e-5)[0] > eps > rdp_epsilon(q, 2.0, steps, 1e-5)[0]


class _Context:
    """What run_strategy reads of a RunContext: the public models and recipe (the clients are the test's)."""

    def __init__(self, base, controlnet, settings):
        from sim.core.models import ddpm_scheduler

        self.base, self.controlnet, self.settings = base, controlnet, settings
        self.scheduler = ddpm_scheduler(base.preset)
        self.null_context = base.encode_prompts([""])

    def public_client(self, scheme):
        from strategies.base import ClientEnv

        cls = get_strategy(scheme).client_class
        return cls(0, ClientEnv(self.base, self.scheduler, self.settings, None, 0, self.controlnet))


def _fedavg_run(base, controlnet, defenses, steps=2, local_steps=1, batch=2, client_seed=CLIENT_SEED):
    from sim.core.models import ddpm_scheduler
    from sim.engine.client_app import client_app_for
    from sim.engine.grid import InProcessGrid, discover
    from sim.engine.runner import run_strategy
    from sim.engine.transcript import Transcript
    from strategies.base import ClientData, ClientEnv, TrainSettings

    g = torch.Generator().manual_seed(0)
    s = base.preset.image_size
    settings = TrainSettings(lr=1e-3, steps=steps, local_steps=local_steps, batch_size=batch, defenses=defenses)
    envs = [ClientEnv(base, ddpm_scheduler(base.preset), settings,
                      ClientData(torch.rand(8, 3, s, s, generator=g) * 2 - 1, torch.rand(8, 3, s, s, generator=g),
                                 [f"a red circle {c}"] * 8), 0, controlnet, client_seed) for c in range(2)]
    grid = InProcessGrid(client_app_for(envs), 2, {})
    return run_strategy("fedavg", _Context(base, controlnet, settings), grid, discover(grid, 2), Transcript(0))


def _delta(res, controlnet) -> torch.Tensor:
    a, b = res.controlnet.state_dict(), controlnet.state_dict()
    return torch.cat([(a[k] - b[k]).flatten() for k in b])


def test_fedavg_with_dp_sgd_runs_a_round_and_its_accountant_is_finite(models):
    base, cn = models
    plain = _fedavg_run(base, cn, ())
    dp = _fedavg_run(base, cn, ("dp-sgd:clip=0.1,noise-multiplier=1",))
    assert dp.steps == 2 and all(math.isfinite(x) for x in dp.losses)
    assert plain.losses[0] == pytest.approx(dp.losses[0], rel=1e-5)  # same first batch, same weights
    assert not torch.equal(_delta(plain, cn), _delta(dp, cn))
    with pytest.raises(RuntimeError, match="without a client-seed"):  # DP noise only from a client-private seed
        _fedavg_run(base, cn, ("dp-sgd:clip=0.1,noise-multiplier=1",), client_seed=-1)
    d = make_defense("dp-sgd:noise-multiplier=1")
    d.sample_rate = 2 / 8
    acc = d.accounting(None, releases=1)
    assert 0 < acc["epsilon"] < math.inf and acc["sample_rate"] == 0.25
    assert d.accounting(None, releases=100)["epsilon"] > acc["epsilon"]


def test_server_dp_clips_the_aggregated_update_and_adds_the_configured_noise(models):
    base, cn = models
    clean = _fedavg_run(base, cn, ("server-dp:clipping-norm=0.01,noise-multiplier=0",))
    assert _delta(clean, cn).norm().item() <= 0.01 * 1.0001  # one round: the mean of updates clipped to C
    noisy = _fedavg_run(base, cn, ("server-dp:clipping-norm=0.01,noise-multiplier=2",))
    assert noisy.extra["server_dp_noise_std"] == [pytest.approx(2 * 0.01 / 2)]
    noise = _delta(noisy, cn) - _delta(clean, cn)  # same clients, same round: the difference is the noise
    assert noise.std().item() == pytest.approx(0.01, rel=0.05)
    assert noisy.losses == clean.losses  # the noise reaches the global model only
    acc = make_defense("server-dp:noise-multiplier=2").accounting(None, releases=4)
    assert acc["epsilon"] == pytest.approx(accounting.composed_epsilon(2.0, 4, 1e-5))


# ----------------------------------------------------------------------------- whole runs (slow)
@pytest.mark.slow
@pytest.mark.parametrize("schemes, defenses", [
    (["vanilla", "nograd"], ["noise:std=0.2", "patch-shuffle"]),  # feature hook on both split schemes
    (["vanilla"], ["local-dp:epsilon=50", "mixup", "nopeek"]),    # feature + loss hooks
    (["fedavg"], ["dp-sgd:clip=1,noise-multiplier=0.5", "server-dp:clipping-norm=5,noise-multiplier=0.01"]),
])
def test_compare_smoke_runs_with_the_baseline_defenses(tmp_path, schemes, defenses):
    from sim.commands.cli import main

    out = tmp_path / "run"
    assert main(["compare", "--preset", "smoke", "--set", f"schemes={json.dumps(schemes)}",
                 "--set", f"defenses={json.dumps(defenses)}", "--out", str(out)]) == 0
    rows = {r["scheme"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    for s in schemes:
        assert rows[s]["steps"] == 8 and math.isfinite(rows[s]["final_loss"])
