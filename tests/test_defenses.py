"""The paper's defenses and latent-dp do what they claim; the noise-target leak is real and closed."""
from __future__ import annotations

import json
import math

import pytest
import torch

from defenses import DefenseStack, HookContext, accounting, make_defense, split_client_features
from defenses.symsigmoid import inverse, symsigmoid
from sim.core.cuts import nograd_control_input
from sim.core.models import ddpm_scheduler, get_preset
from strategies import get_strategy
from strategies.base import client_secret, private_generator

SCHED = ddpm_scheduler(get_preset("tiny"))
CLIENT_SEED = 5  # the client-side seed of the clients' private draws (tests play the harness, which holds it)
NOGRAD = get_strategy("nograd")


def _client_ctx(t: torch.Tensor, cid: int = 0, **kw) -> HookContext:
    """A hook context as client ``cid`` builds it: its private generator and secret from the client seed."""
    return HookContext(t, SCHED, cid, private_generator(CLIENT_SEED, cid),
                       secret=client_secret(CLIENT_SEED, cid, 1), **kw)


def test_symsigmoid_is_odd_monotone_and_invertible():
    x = torch.linspace(-6, 6, 2001)
    y = symsigmoid(x)
    assert torch.allclose(symsigmoid(-x), -y)
    assert (y[1:] > y[:-1]).all()
    assert torch.allclose(inverse(y), x, atol=1e-4)
    assert torch.allclose(y, x.abs() * (2 * torch.sigmoid(x) - 1), atol=1e-6)


def test_symsigmoid_is_applied_at_inference(tiny_base, monkeypatch):
    from conftest import perturb_zero_convs
    from sim.engine.evaluate import generate
    from sim.core.models import build_controlnet

    import defenses.symsigmoid as mod

    cn = perturb_zero_convs(build_controlnet(tiny_base.unet, tiny_base.preset))
    calls = []
    real = mod.symsigmoid
    monkeypatch.setattr(mod, "symsigmoid", lambda x: calls.append(1) or real(x))
    hints = torch.rand(2, 3, 32, 32)
    a = generate(tiny_base, ["a red circle", "a blue circle"], "nograd", cn, hints, steps=2, guidance=1.0,
                 progress=False)
    assert not calls
    b = generate(tiny_base, ["a red circle", "a blue circle"], "nograd", cn, hints, steps=2, guidance=1.0,
                 progress=False, defenses=("symsigmoid",))
    assert len(calls) == 2  # once per sampling step
    assert not torch.allclose(a, b)


def test_timestep_policy_never_samples_below_t_start(tiny_base):
    from strategies.base import ClientData, ClientEnv, TrainSettings
    from strategies.nograd import NoGradClient

    data = ClientData(torch.rand(16, 3, 32, 32) * 2 - 1, torch.rand(16, 3, 32, 32), ["a red circle"] * 16)
    settings = TrainSettings(lr=1e-3, steps=1, local_steps=1, batch_size=64, defenses=("timestep:t-start=536",))
    client = NoGradClient(0, ClientEnv(tiny_base, SCHED, settings, data, 0, None))
    ts = torch.cat([client.next_batch().t for _ in range(20)])
    assert int(ts.min()) >= 536 and int(ts.max()) <= 999 and int(ts.min()) < 560


def test_timestep_target_accounting():
    from defenses.timestep_target import epsilon_at, t_start_for

    sens = accounting.replace_one_sensitivity(3 * 32 * 32)
    starts = [t_start_for(SCHED, e, 1e-5, sens) for e in (4, 16, 64, 256)]
    assert starts == sorted(starts, reverse=True) and len(set(starts)) == 4  # weaker target -> smaller t_start
    t0 = starts[1]
    abar = SCHED.alphas_cumprod
    assert epsilon_at(float(abar[t0]), sens, 1e-5) <= 16 < epsilon_at(float(abar[t0 - 1]), sens, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        make_defense("timestep-target:delta=1")  # the reference's delta = 1 is refused


@pytest.mark.parametrize("eps", [0.5, 1.0, 8.0, 64.0])
def test_analytic_gaussian_mechanism_round_trip(eps):
    s = accounting.multiplier_for(eps, 1e-5)
    assert accounting.epsilon_for(s, 1e-5) == pytest.approx(eps, rel=1e-6)
    if eps < 1:  # the classical bound is valid (and looser) there
        assert s <= math.sqrt(2 * math.log(1.25 / 1e-5)) / eps
    assert accounting.composed_epsilon(s, 4, 1e-5) > eps


def _release_batch(spec: str, n: int = 256, idx=None, seed: int = 0):
    """A batch of random latents in [-1, 1] through ``spec``'s latent hook, as a client sends it."""
    stack = DefenseStack([spec], NOGRAD)
    g = torch.Generator().manual_seed(seed)
    z0 = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    t = torch.randint(stack.t_start(SCHED), 1000, (n,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    idx = torch.arange(n) if idx is None else idx
    ctx = _client_ctx(t, z0=z0, idx=idx, noise=eps)
    return stack, z0, t, eps, stack.latent(SCHED.add_noise(z0, eps, t), ctx)


def _check_valid_sample_and_unbiased_target(z0, lat, abar=None):
    """The sent x is a forward-process sample of signal level ``abar`` (default: the sent t's; noise
    variance 1 - abar), and the sent target is unbiased for its noise: regressing it on the true
    (normalised) noise gives slope 1."""
    a = (SCHED.alphas_cumprod[lat.t] if abar is None else abar).float().view(-1, 1, 1, 1)
    noise = (lat.unet - a.sqrt() * z0) / (1 - a).sqrt()
    assert float(noise.flatten(1).var(1).mean()) == pytest.approx(1.0, abs=0.01)
    slope = (lat.target * noise).flatten(1).mean(1) / noise.flatten(1).pow(2).mean(1)
    assert float(slope.mean()) == pytest.approx(1.0, abs=0.01)
    return noise


def test_latent_dp_releases_a_valid_later_sample_with_an_unbiased_target(tiny_base):
    stack, z0, t, eps, lat = _release_batch("latent-dp:epsilon=64")
    (d,) = stack.defenses
    tab = d.table(SCHED)
    # the noise is at least the calibrated s sqrt(abar_t) Delta, and lands exactly on the sent t'
    s_min = accounting.multiplier_for(64.0, 1e-5) * SCHED.alphas_cumprod[t].double().sqrt() * 2 * math.sqrt(3072)
    assert (tab["sigma"][t] >= s_min * (1 - 1e-9)).all()
    assert (lat.t >= t).all() and torch.equal(lat.unet, lat.control)  # one draw, both branches
    abar = SCHED.alphas_cumprod.double()
    level = abar[t] / (1 + tab["sigma"][t] ** 2)  # x' = sqrt(level) z0 + sqrt(1 - level) noise
    _check_valid_sample_and_unbiased_target(z0, lat, level)
    # the sent t' is the schedule step nearest to that level in log-SNR
    log_snr = (abar / (1 - abar)).log()
    off = ((level / (1 - level)).log() - log_snr[lat.t]).abs()
    assert (off[:, None] <= (log_snr[None, :] - (level / (1 - level)).log()[:, None]).abs() + 1e-9).all()
    # the server weights each sample by the inverse variance of its target
    w = stack.target_weights(lat.t, lat.target, SCHED)
    assert torch.allclose(w, 1 / tab["target_scale"][t].float() ** 2, rtol=0.05)
    # the server's public estimate: the batch timestep back, z0 up to sigma_t / sqrt(abar_t)
    back = stack.source_timestep(lat.t, lat.target, SCHED)
    assert float((back == t).float().mean()) > 0.7 and int((back - t).abs().max()) <= 5
    z0_hat, std = stack.estimate_z0(lat.unet, lat.t, lat.target, SCHED)
    err = (z0_hat - z0).flatten(1).std(1)
    assert float((err / std).mean()) == pytest.approx(1.0, abs=0.02)
    # the t_start rule: private noise <= ratio * diffusion noise from t_start on, not before
    t0, abar = stack.t_start(SCHED), SCHED.alphas_cumprod.double()
    assert float(d.sigma_min(SCHED, torch.tensor([t0]))[0]) <= math.sqrt(1 - float(abar[t0]))
    assert float(d.sigma_min(SCHED, torch.tensor([t0 - 1]))[0]) > math.sqrt(1 - float(abar[t0 - 1]))
    assert stack.trained_from(SCHED) == int(tab["t_out"][t0]) > t0  # sampling applies control from there
    # not applied when sampling: no private z0 there
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(stack.latent(x, HookContext(t[:4], SCHED, 0, torch.Generator(), inference=True)).unet, x)
    acc = d.accounting(SCHED, releases=10)
    assert acc["epsilon_per_step"] == 64.0 and acc["epsilon_per_run"] > 64.0


def test_one_shot_releases_each_record_once(tiny_base):
    records = torch.arange(8).repeat(32)  # every record drawn 32 times
    stack, z0, t, eps, _ = _release_batch("one-shot:t0=600", idx=records)
    z0 = z0[:8].repeat(32, 1, 1, 1)  # the same record has the same latent every time it is drawn
    lat = stack.latent(SCHED.add_noise(z0, eps, t), _client_ctx(t, z0=z0, idx=records, noise=eps))
    assert (t > 600).all() and stack.trained_from(SCHED) == 601
    _check_valid_sample_and_unbiased_target(z0, lat)
    r = SCHED.alphas_cumprod[t].double() / SCHED.alphas_cumprod[600].double()
    assert torch.allclose(stack.target_weights(t, lat.target, SCHED).double(), (1 - r) / (1 - SCHED.alphas_cumprod[t]))
    # from any one step the server rebuilds the release exactly, and it is the same in every step
    z0_hat, std = stack.estimate_z0(lat.unet, lat.t, lat.target, SCHED)
    for r in range(8):
        same = z0_hat[records == r]
        assert torch.allclose(same, same[0].expand_as(same), atol=1e-3)
    assert not torch.allclose(z0_hat[0], z0_hat[1], atol=0.1)  # records' noises differ
    a0 = float(SCHED.alphas_cumprod[600])
    assert float((z0_hat[:8] - z0[:8]).std()) == pytest.approx(math.sqrt((1 - a0) / a0), rel=0.05)
    assert float(std[0]) == pytest.approx(math.sqrt((1 - a0) / a0))
    # another client's secret: another release of the same latent
    other = stack.latent(SCHED.add_noise(z0, eps, t), HookContext(t, SCHED, 1, torch.Generator(), z0=z0, idx=records,
                                                                  noise=eps, secret=client_secret(CLIENT_SEED, 1, 1)))
    assert not torch.allclose(other.unet, lat.unet)
    # the guarantee does not compose over the steps that resend a record
    acc = stack.defenses[0].accounting(SCHED, releases=12)
    assert acc["epsilon_per_run"] == acc["epsilon_per_record"] == stack.defenses[0].accounting(SCHED)["epsilon_per_run"]
    # t0 from a privacy target: the smallest timestep whose single release reaches it
    d = make_defense("one-shot:epsilon=8")
    d.bind(3072)
    assert d.accounting(SCHED)["epsilon_per_record"] <= 8 < make_defense_at(d.t0(SCHED) - 1)
    with pytest.raises(ValueError, match="record ids"):
        stack.latent(z0, _client_ctx(t))


def make_defense_at(t0: int) -> float:
    d = make_defense(f"one-shot:t0={t0}")
    d.bind(3072)
    return d.accounting(SCHED)["epsilon_per_record"]


def test_fp16_wire_round_trip_halves_the_bytes(tiny_base):
    from sim.core.wire import decode, encode, record_nbytes
    from strategies.nograd import Features

    x_t, hint = torch.randn(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    t = torch.randint(0, 1000, (4,))
    sizes = {}
    for specs in ((), ("fp16",)):
        stack = DefenseStack(specs, NOGRAD)
        ctx = _client_ctx(t)
        c, u = split_client_features(stack, lambda x: nograd_control_input(tiny_base.autoencoder, x, hint),
                                     tiny_base.unet, x_t, ctx)
        msg = Features(c.to(stack.wire_dtype)[None], u.to(stack.wire_dtype)[None], t[None],
                       torch.randn(1, 4, 3, 32, 32), None)
        back = decode(encode(msg), Features)
        assert back.control_input.dtype == stack.wire_dtype
        if specs:
            assert torch.equal(back.control_input[0].float(), c.half().float())
            assert torch.allclose(c, x_t + hint * 2 - 1, atol=1e-2)  # fp16 precision, no other change
        sizes[specs] = record_nbytes(encode(msg))
    assert sizes[("fp16",)] < 0.6 * sizes[()]


def test_fp16_offset_is_fixed_per_client_and_drawn_from_its_secret(tiny_base):
    from defenses.fp16 import client_offset
    from sim.core.splits import ClientData
    from strategies.base import ClientEnv, TrainSettings
    from strategies.nograd import FeaturesRequest, NoGradClient

    secret = lambda seed, cid: client_secret(seed, cid, 1)  # the offset's stream
    shape = (3, 4, 4)
    assert torch.equal(client_offset(secret(CLIENT_SEED, 0), shape), client_offset(secret(CLIENT_SEED, 0), shape))
    assert not torch.equal(client_offset(secret(CLIENT_SEED, 0), shape), client_offset(secret(CLIENT_SEED, 1), shape))
    assert not torch.equal(client_offset(secret(CLIENT_SEED, 0), shape), client_offset(secret(CLIENT_SEED + 1, 0), shape))
    d = make_defense("fp16:offset=true")
    x, t = torch.zeros(2, *shape), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="secret"):  # no secret, no offset (never a public default)
        d.feature("control", x, HookContext(t, SCHED, 0, torch.Generator()))
    assert torch.equal(d.feature("control", x, _client_ctx(t, cid=1))[0], client_offset(secret(CLIENT_SEED, 1), shape))
    assert torch.equal(d.feature("unet", x, _client_ctx(t, cid=1)), x)  # the control branch only

    # what a real client sends: E(hint) + x_t plus the offset of client_secret(client-seed, cid, 1), in fp16
    g = torch.Generator().manual_seed(0)
    data = ClientData(torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, torch.rand(4, 3, 32, 32, generator=g), ["a"] * 4)
    settings = TrainSettings(lr=1e-3, steps=1, local_steps=1, batch_size=2, defenses=("fp16:offset=true",))
    env = ClientEnv(tiny_base, SCHED, settings, data, 0, None, CLIENT_SEED)
    client, replay = NoGradClient(1, env), NoGradClient(1, env)
    sent = client.serve(FeaturesRequest(1)).control_input[0].float()
    b = replay.next_batch()  # the same public batch stream
    clean = nograd_control_input(tiny_base.autoencoder, b.x_t, b.hint)
    offset = client_offset(secret(CLIENT_SEED, 1), tuple(clean.shape[1:]))
    assert torch.allclose(sent, clean + offset, atol=1e-2)
    assert not torch.allclose(sent, clean + client_offset(secret(CLIENT_SEED + 1, 1), tuple(clean.shape[1:])), atol=0.1)
    with pytest.raises(RuntimeError, match="without a client-seed"):  # no client seed: it refuses
        NoGradClient(1, ClientEnv(tiny_base, SCHED, settings, data, 0, None)).serve(FeaturesRequest(1))


def test_inapplicable_defenses_are_refused_with_the_reason():
    from sim.engine.context import load_experiment

    with pytest.raises(ValueError, match="symsigmoid.*fedavg.*weights"):
        DefenseStack(["symsigmoid"], get_strategy("fedavg"))
    with pytest.raises(ValueError, match="'timestep' does not apply to scheme 'fedavg'"):
        load_experiment("smoke", ["defenses=pp-reference"])  # smoke has fedavg among its schemes
    with pytest.raises(ValueError, match="unknown defense"):
        DefenseStack(["no-such-defense"], NOGRAD)
    with pytest.raises(ValueError, match="no parameter"):
        make_defense("symsigmoid:strength=2")
    cfg = load_experiment("smoke", ["defenses=pp-reference", "schemes=vanilla,nograd,splitfed"])
    assert cfg.defenses == ("pp-reference",)
    assert make_defense("symsigmoid").not_applicable(get_strategy("splitfed")) is None
    assert "fedavg" in make_defense("symsigmoid").not_applicable(get_strategy("fedavg"))


def test_defenses_cli_lists_declarations_and_the_timestep_table(capsys):
    from sim.commands.cli import main

    assert main(["defenses", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = {d["name"] for d in out["defenses"]}
    assert {"timestep", "timestep-target", "symsigmoid", "fp16", "prompt-local", "latent-dp"} <= names
    rows = out["timestep_table"]["rows"]
    ts = [r["t_start"] for r in rows if r["t_start"] is not None]
    assert ts == sorted(ts, reverse=True)
    for d in out["defenses"]:
        assert d["hooks"] and d["schemes"] and d["threat_model"]


# ----------------------------------------------------------------------------- whole runs, attacked
def _run(tmp_path, name: str, overrides: list[str]):
    from sim.engine.runner import run_compare
    from sim.core.config import load_config

    cfg = load_config("smoke", ["schemes=vanilla,nograd", "keep-messages=1000", "steps=6", *overrides])
    out = tmp_path / name
    run_compare(cfg, out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("defended")
    return {name: _run(tmp, name, ov) for name, ov in {
        "none": [], "pp-reference": ["defenses=pp-reference"], "pp-protected": ["defenses=pp-protected"]}.items()}


def _blind_ssim(run, scheme: str) -> float:
    """A blind guess: the mean auxiliary image, scored against the private targets."""
    from attacks.scoring import image_scores
    from sim.engine.clientside import load_run_config
    from sim.engine.scoring import server_view
    from sim.engine.truth import private_samples

    view = server_view(run, scheme)
    refs = [(b["ref"][0], b["ref"][1], j) for b in view.batches() for j in range(b["t"].shape[0])]
    truth = private_samples(load_run_config(run), scheme, view.messages, refs, view.history)
    guess = view.aux(256)["target"].mean(0, keepdim=True).expand_as(truth["target"])
    return image_scores(guess, truth["target"], signed=True)["ssim"]


@pytest.mark.slow
def test_noise_target_attack_breaks_the_reference_and_not_pp_protected(runs):
    from sim.engine.clientside import load_run_config
    from sim.engine.scoring import attack_view, server_view

    rows = {}
    for name, run in runs.items():
        for scheme in ("vanilla", "nograd"):  # scored with the whole config, which only the harness holds
            rows[name, scheme] = attack_view(server_view(run, scheme), "noise-target", load_run_config(run))
    for scheme in ("vanilla", "nograd"):
        assert rows["none", scheme]["image"]["ssim"] >= 0.99
        assert rows["pp-reference", scheme]["image"]["ssim_median"] >= 0.95  # fp16 + t >= 226 do not stop it
    assert rows["none", "nograd"]["hint"]["ssim"] >= 0.99
    assert rows["pp-reference", "nograd"]["hint"]["ssim_median"] >= 0.9  # symsigmoid inverted, offset estimated
    for scheme in ("vanilla", "nograd"):
        protected = rows["pp-protected", scheme]["image"]["ssim"]
        assert protected <= _blind_ssim(runs["pp-protected"], scheme) + 0.05, protected


@pytest.mark.slow
def test_wire_audit_no_prompt_leaves_a_protected_client(runs):
    """Every record the server received in a whole pp-protected run: no prompt string, no
    token ids, no text embedding (of any prompt the clients hold, or of the empty prompt)."""
    from sim.engine.clientside import load_run_config
    from sim.engine.context import context_for
    from sim.engine.scoring import server_view

    run = runs["pp-protected"]
    cfg = load_run_config(run)  # the clients' keys too: the audit needs their prompts
    ctx = context_for(cfg)
    base = ctx.base
    clients = ctx.client_data(cfg)
    prompts = sorted({p for c in clients for p in c.prompts})
    words = {w for p in prompts for w in p.split()} - {"a", "on"}
    embeddings = base.encode_prompts(prompts + [""])  # (P, L, D)
    for scheme in ("vanilla", "nograd"):
        view = server_view(run, scheme)
        stats = [json.loads(line) for line in (run / "transcript.jsonl").read_text().splitlines()]
        assert len(view.messages) == sum(s["scheme"] == scheme for s in stats) > 0  # the whole run was kept
        for m in view.messages:
            up = m["up"]
            for key, rec in up.items():
                for k, v in rec.items():
                    assert "context" not in k and "prompt" not in k
                    if isinstance(v, str):
                        assert not any(w in v for w in words), (key, k, v)
                    if isinstance(v, torch.Tensor) and not v.is_floating_point() and k != "t":
                        raise AssertionError(f"integer tensor {k!r} crossed the wire (token ids?)")
                    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape[-1] == embeddings.shape[-1]:
                        flat = v.float().reshape(-1, v.shape[-1])
                        for e in embeddings.reshape(-1, embeddings.shape[-1]):
                            if e.abs().sum() > 0:
                                assert not torch.isclose(flat, e, atol=1e-4).all(dim=1).any()


def test_run_guarantee_composes_over_the_most_sent_record(tmp_path):
    """The summary's epsilon is the accounted defense's at the largest number of times any record was sent,
    counted by replaying the clients' batch streams; the replayed counts are the ones the clients drew."""
    from sim.core.config import load_config
    from sim.engine.context import context_for
    from sim.engine.privacy import guarantee_columns, release_counts, run_guarantees

    cfg = load_config("smoke", ["schemes=[\"nograd\"]", "steps=6", "local-steps=2", "client-seed=7",
                                "defenses=[\"latent-dp:epsilon=64\", \"local-dp:epsilon=4\"]"])
    ctx = context_for(cfg)
    strategy = get_strategy("nograd")
    stats = [{"client": c, "round": r, "num_steps": 2, "index": r} for r, c in enumerate([0, 1, 0])]
    drawn = {}
    for cid, n in ((0, 4), (1, 2)):
        client = strategy.client_class(cid, ctx.client_env(cfg, cid))
        idx = torch.cat([client.next_batch().idx for _ in range(n)])  # what the client really sends
        drawn[cid] = torch.bincount(idx, minlength=len(client.data))
        fresh = strategy.client_class(cid, ctx.client_env(cfg, cid))
        assert torch.equal(fresh.releases(n), drawn[cid])
    most = int(max(d.max() for d in drawn.values()))
    assert release_counts(cfg, "nograd", stats)["record"] == most >= 2  # a batch of 8 from few records repeats
    g = {x["defense"]: x for x in run_guarantees(cfg, "nograd", stats)}
    mult = accounting.multiplier_for(64.0, 1e-5)
    assert g["latent-dp"]["epsilon"] == pytest.approx(accounting.composed_epsilon(mult, most, 1e-5))
    assert g["latent-dp"]["releases"] == most and g["latent-dp"]["epsilon"] > 64.0
    cols = guarantee_columns(list(g.values()))
    assert cols["epsilon"] == max(x["epsilon"] for x in g.values()) and cols["delta"] == 1e-5
    # the ServerApp has only the public config: no counts, no run-level epsilon claimed
    public = run_guarantees(cfg.public(), "nograd", stats)
    assert all(x["epsilon"] is None and x["epsilon_per_release"] > 0 for x in public)
    assert run_guarantees(load_config("smoke", ["schemes=[\"nograd\"]"]), "nograd", stats) == []


@pytest.mark.slow
def test_latent_dp_never_makes_the_model_worse_than_no_control(tmp_path):
    """latent-dp trains on valid samples with unbiased targets: at heavy noise its ControlNet scores at least
    the base model without control (minus one standard error); at negligible noise it matches the
    undefended run (within the two runs' combined standard error, twice)."""
    from sim.core.config import load_config
    from sim.engine.runner import run_compare

    recipe = ["schemes=[\"nograd\"]", "steps=150", "ddim-steps=10", "eval-samples=32", "jobs=1",
              "client-seed=11", "keep-messages=0"]
    rows = {}
    for name, defenses, baseline in (("none", "[]", "true"), ("heavy", "[\"latent-dp:epsilon=1024,t-start=0\"]", "false"),
                                     ("light", "[\"latent-dp:epsilon=1e5,t-start=0\"]", "false")):
        cfg = load_config("default", recipe + [f"defenses={defenses}", f"baseline={baseline}"])
        for r in run_compare(cfg, tmp_path / name)["rows"]:
            rows[r["scheme"] if r["scheme"].startswith("base") else name] = r
    base, none, heavy, light = rows["base (no control)"], rows["none"], rows["heavy"], rows["light"]
    assert heavy["outline_iou"] >= base["outline_iou"] - heavy["outline_iou_se"]
    assert abs(light["outline_iou"] - none["outline_iou"]) <= 2 * math.hypot(light["outline_iou_se"],
                                                                             none["outline_iou_se"])
    assert none["outline_iou"] > base["outline_iou"] + 0.1  # the budget is enough for control to show
    assert heavy["epsilon"] > 1024 and light["delta"] == 1e-5
