"""Learning-based inversion with a known client model (He et al. 2019; the paper's first effective attack).

Threat model: a passive, honest-but-curious server that knows the client's model
(white-box: under nograd the client holds only public frozen parts, E and
``unet.conv_in``; under vanilla the trainable head's weights are relayed through the
server at every turn start, so it knows the head each turn began with, and the one it
ended with where that reply is kept), the public
defense stack of the run (Kerckhoffs) and has public auxiliary data. It does NOT use the
noise target eps (``use-noise=false``, the default: that is the noise-target attack's
job; ``use-noise=true`` is an ablation that feeds eps to the decoder as well).

1. Simulate the client on auxiliary data: t from the run's public timestep policy,
   fresh noise, x_t, then :func:`defenses.client_release` with the public stack
   (its private randomness drawn from the attacker's own generator; a per-client fixed
   offset, if the stack has one, from "shadow" client ids the real clients never use).
   Under vanilla every simulated batch goes through one of the attacked batches' heads as
   the server knows them from the transcript (:func:`head_for`: the head relayed at the
   turn's start, interpolated toward the turn's returned head where that is kept too).
2. Train a small CNN decoder from the sent features -- the control branch, the UNet
   branch (also as x_t, through an exact local inverse of the public conv_in) and the
   public t (as sqrt(abar_t), sqrt(1 - abar_t) planes) -- to the target's
   latent z0 and the hint's latent E(hint); MSE. With the identity autoencoder of the
   tiny preset the latents are the images; at SD scale the public decoder maps them back.
3. Apply it to every sent batch; decode.

Against a fixed per-client offset (``fp16:offset=true``) both training and attack
subtract the client's mean control feature over the client's sent samples (for the
simulated clients: over as many simulated samples), so the unknown offset cancels up to
the data's own mean, which the decoder learns.

What it can reach: the UNet branch is conv_in(x_t), injective, so x_t is in reach; without
eps the best image estimate is E[z0 | x_t, t], sharp at low t and a blur of the aux mean at
high t (the timestep policy helps exactly here). The hint enters the control branch at full
scale under nograd (h = E(hint) + x_t) but only through the head's zero-initialised
``controlnet_cond_embedding`` under vanilla (weak until the head has trained).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from defenses import HookContext, client_release
from sim.core.cuts import control_head, nograd_control_input
from strategies.vanilla import ControlHead

from .base import Attack, Reconstruction, ServerView, register
from .common import fit_on_stream, signed_to_hint

SHADOW_CID = 1_000_000  # simulated ("shadow") client ids start here: no real client has one
ATTACK_SEED = 31_337  # the attacker's own randomness (aux batches, t, noise, defense draws)


# ----------------------------------------------------------------------------- public knowledge
def offset_used(stack) -> bool:
    """Does the public stack add a fixed per-client offset to the control branch (fp16:offset=true)?"""
    return any(d.name == "fp16" and d.p.get("offset") for d in stack.defenses)


def vanilla_heads(view: ServerView) -> dict[int, dict]:
    """The head states the server relayed to a client at a turn's start, by message index."""
    return {i: m["down"]["head"] for i, m in enumerate(view.messages) if m["down"].get("head") is not None}


def returned_heads(view: ServerView) -> dict[int, dict]:
    """The head states clients returned at the end of their turns, by message index."""
    return {i: m["up"]["head"] for i, m in enumerate(view.messages) if m["up"].get("head") is not None}


def head_for(view: ServerView, msg: int, relayed: dict[int, dict] | None = None,
             returned: dict[int, dict] | None = None):
    """The vanilla client's head as the server best knows it for the batch sent in message ``msg``.

    The head relayed at the start of that turn (message s) is exact for the turn's first batch;
    the batch of message i ran i - s client AdamW steps further. Where the same turn's returned
    head (message e, after e - s steps) is in the transcript too, the weights are interpolated
    linearly, (i - s) / (e - s) of the way; the server cannot replay the steps themselves (they
    need the private inputs). Without a kept relay: the final head (also relayed by the server).
    """
    relayed = vanilla_heads(view) if relayed is None else relayed
    returned = returned_heads(view) if returned is None else returned
    starts = [i for i in relayed if i <= msg]
    head = ControlHead(view.controlnet_init)
    if starts:
        s = max(starts)
        nxt = min([i for i in relayed if i > s], default=len(view.messages))
        ends = [j for j in returned if msg <= j < nxt]
        state = relayed[s]
        if ends and (w := (msg - s) / (min(ends) - s)) > 0:
            state = {k: (1 - w) * v + w * returned[min(ends)][k] for k, v in state.items()}
        head.load_state_dict(state)
    elif view.controlnet_final is not None:
        head = ControlHead(view.controlnet_final)
    return head.eval().requires_grad_(False)


def attacked_heads(view: ServerView, batches: list[dict]) -> list:
    """The heads of the attacked batches (one per distinct message; see :func:`head_for`)."""
    relayed, returned = vanilla_heads(view), returned_heads(view)
    return [head_for(view, i, relayed, returned) for i in sorted({b["ref"][0] for b in batches})]


def local_inverse(conv: nn.Conv2d, size: int, seed: int = 0) -> nn.Conv2d:
    """A small conv that inverts the public ``unet.conv_in`` exactly: least squares on random inputs.

    conv_in maps C latent channels to many more, so a 5x5 left inverse exists (checked in the tests:
    error ~1e-6, borders included); 3x3 where 5x5 would need too many unknowns (SD: 320 channels).
    The decoder gets x_t for free instead of having to learn this inversion.
    """
    cin, cout = conv.in_channels, conv.out_channels
    k = 5 if cout * 25 <= 2048 else 3
    cols = cout * k * k
    n = (4 * cols) // (size * size) + 1
    x = torch.randn(n, cin, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = conv(x)
    A = F.unfold(y, k, padding=k // 2).permute(0, 2, 1).reshape(-1, cols)
    A = torch.cat([A, torch.ones(A.shape[0], 1)], dim=1).double()
    sol = torch.linalg.lstsq(A, x.permute(0, 2, 3, 1).reshape(-1, cin).double()).solution.float()
    inv = nn.Conv2d(cout, cin, k, padding=k // 2)
    with torch.no_grad():
        inv.weight.copy_(sol[:-1].T.reshape(cin, cout, k, k))
        inv.bias.copy_(sol[-1])
    return inv.eval().requires_grad_(False)


def t_planes(t: torch.Tensor, scheduler, like: torch.Tensor) -> torch.Tensor:
    """sqrt(abar_t) and sqrt(1 - abar_t) as two constant planes per sample (t is sent in the clear)."""
    abar = scheduler.alphas_cumprod[t.cpu()].float().view(-1, 1, 1, 1)
    planes = torch.cat([abar.sqrt(), (1 - abar).sqrt()], dim=1)
    return planes.expand(-1, -1, *like.shape[-2:])


class ClientSimulator:
    """The split client on auxiliary data, through the run's public defense stack.

    ``head`` (vanilla) is a module or a list of modules (one is drawn per batch); ``cids``
    the client ids the simulated clients use (shadow ids: a per-client offset is then a
    fresh unknown, as the real one is to the server).
    """

    def __init__(self, view: ServerView, aux: dict, head=None, seed: int = ATTACK_SEED):
        self.view, self.aux = view, aux
        self.stack = view.defenses
        self.scheduler = view.scheduler
        self.t_start = self.stack.t_start(view.scheduler)
        self.heads = head if isinstance(head, (list, tuple)) else [head]
        self.gen = torch.Generator().manual_seed(seed)
        self.defense_gen = torch.Generator().manual_seed(seed + 1)
        self.T = view.scheduler.config.num_train_timesteps

    def _branch(self, head, hint):
        """The simulated client's control branch (the scheme's: h = E(hint) + x_t, or the head's output)."""
        if self.view.client_part == "frozen":
            return lambda x: nograd_control_input(self.view.base.autoencoder, x, hint)
        return lambda x: control_head(head, x, hint)

    def draw(self, n: int, idx: torch.Tensor | None = None, cid: int | torch.Tensor | None = None,
             head=None, grad: bool = False) -> dict:
        """Simulate ``n`` samples; returns control, unet (features as sent), t and noise (as sent), z0, e_hint, idx, cid."""
        ae, unet = self.view.base.autoencoder, self.view.base.unet
        N = len(self.aux["target"])
        idx = torch.randint(0, N, (n,), generator=self.gen) if idx is None else idx
        cid = SHADOW_CID if cid is None else cid
        with torch.no_grad():
            z0 = ae.encode(self.aux["target"][idx])
            e_hint = ae.encode(self.aux["condition"][idx] * 2 - 1)
        hint = self.aux["condition"][idx]
        t = torch.randint(self.t_start, self.T, (n,), generator=self.gen, dtype=torch.int64)
        noise = torch.randn(z0.shape, generator=self.gen)
        x_t = self.scheduler.add_noise(z0, noise, t)
        if head is None and self.view.client_part == "head":
            head = self.heads[int(torch.randint(0, len(self.heads), (1,), generator=self.gen))]
        cids = cid if isinstance(cid, torch.Tensor) else torch.full((n,), int(cid))
        parts, feats, ts, targets, order = [], [], [], [], []
        with torch.set_grad_enabled(grad):
            for c in cids.unique().tolist():  # a per-client offset depends on the cid
                sel = (cids == c).nonzero().flatten()
                # a shadow client's own secret (its fixed offset, per-record releases): the real clients' are
                # unknown; the auxiliary sample ids stand in for record ids
                ctx = HookContext(t[sel], self.scheduler, int(c), self.defense_gen, secret=ATTACK_SEED * 1_000 + int(c),
                                  z0=z0[sel], idx=idx[sel], noise=noise[sel])
                r = client_release(self.stack, self._branch(head, hint[sel]), unet, x_t[sel], ctx)
                parts.append(r.control.float())
                feats.append(r.unet_features.float())
                ts.append(r.t)
                targets.append(r.target)
                order.append(sel)
            back = torch.cat(order).argsort()
            control, unet_f = torch.cat(parts)[back], torch.cat(feats)[back]
        # t and noise as sent (a latent defense may move the timestep and rescale the target)
        return {"control": control, "unet": unet_f, "t": torch.cat(ts)[back], "noise": torch.cat(targets)[back],
                "z0": z0, "e_hint": e_hint, "idx": idx, "cid": cids}


# ----------------------------------------------------------------------------- the decoder
class _Res(nn.Module):
    def __init__(self, width: int, dilation: int = 1):
        super().__init__()
        groups = math.gcd(8, width)
        self.n1, self.c1 = nn.GroupNorm(groups, width), nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)
        self.n2, self.c2 = nn.GroupNorm(groups, width), nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return x + self.c2(F.gelu(self.n2(self.c1(F.gelu(self.n1(x))))))


class InverseNet(nn.Module):
    """A small U-Net decoder: sent features (+ t planes) -> (z0, E(hint)) latents.

    Full resolution stays narrow (``width`` channels, a 1x1 entry conv: the sent branches are
    local, nearly linear functions of x_t and the hint), two stride-2 levels at 2x ``width``
    with dilated residual blocks give the whole-image context the aux prior needs at high t. A
    linear 3x3 shortcut from input to output carries the part a local linear map inverts
    exactly (x_t from conv_in(x_t), which has 32 channels per 3; E(hint) = h - x_t under nograd).
    Inputs are standardised per channel with statistics of the simulated features.
    """

    def __init__(self, in_ch: int, out_ch: int, width: int = 24, depth: int = 2):
        super().__init__()
        w, w2 = width, 2 * width
        self.register_buffer("mean", torch.zeros(1, in_ch, 1, 1))
        self.register_buffer("std", torch.ones(1, in_ch, 1, 1))
        self.inp = nn.Sequential(nn.Conv2d(in_ch, w, 1), nn.GELU(), nn.Conv2d(w, w, 3, padding=1))
        self.down1 = nn.Sequential(nn.GELU(), nn.Conv2d(w, w2, 3, stride=2, padding=1), _Res(w2))
        self.down2 = nn.Sequential(nn.Conv2d(w2, w2, 3, stride=2, padding=1),
                                   *[_Res(w2, (1, 2)[i % 2]) for i in range(depth)])
        self.up2 = nn.Sequential(nn.Conv2d(2 * w2, w2, 1), _Res(w2))
        self.up1 = nn.Sequential(nn.Conv2d(w2 + w, w, 1), nn.GELU(), nn.Conv2d(w, w, 3, padding=1), nn.GELU())
        self.out = nn.Conv2d(w, out_ch, 3, padding=1)
        self.linear = nn.Conv2d(in_ch, out_ch, 3, padding=1)  # the exact part (x_t, h - x_t) is local and linear

    def fit_normaliser(self, x: torch.Tensor) -> None:
        self.mean.copy_(x.mean(dim=(0, 2, 3), keepdim=True))
        self.std.copy_(x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))

    def forward(self, x):
        x0 = (x - self.mean) / self.std
        h0 = self.inp(x0)
        h1 = self.down1(h0)
        h2 = self.down2(h1)
        u1 = self.up2(torch.cat([h1, F.interpolate(h2, size=h1.shape[-2:], mode="nearest")], dim=1))
        u0 = self.up1(torch.cat([h0, F.interpolate(u1, size=h0.shape[-2:], mode="nearest")], dim=1))
        return self.out(u0) + self.linear(x0)


def decoder_input(control: torch.Tensor, unet_f: torch.Tensor, t: torch.Tensor, scheduler,
                  branches: str = "both", noise: torch.Tensor | None = None, inverse: nn.Module | None = None
                  ) -> torch.Tensor:
    """What the decoder reads: the chosen sent branches (the UNet branch also as x_t through the public
    conv's ``inverse``), t planes and (ablation only) the noise target."""
    parts = []
    if branches in ("both", "control"):
        parts.append(control.float())
    if branches in ("both", "unet"):
        parts.append(unet_f.float())
        if inverse is not None:
            with torch.no_grad():
                parts.append(inverse(unet_f.float()))
    parts.append(t_planes(t, scheduler, unet_f))
    if noise is not None:
        parts.append(noise.float())
    return torch.cat(parts, dim=1)


class OffsetCentering:
    """Cancels a fixed per-client offset on the control branch: subtract the client's mean control
    over its sent samples. The simulated side uses a pool of shadow clients, each with the same number
    of samples as a real client sent, so training and attack see the same statistic."""

    def __init__(self, sim: ClientSimulator, real_batches: list[dict], pool: int = 24):
        per_client: dict[int, list[torch.Tensor]] = {}
        for b in real_batches:
            per_client.setdefault(b["cid"], []).append(b["control"])
        self.real = {c: torch.cat(v).mean(0) for c, v in per_client.items()}
        n = max(1, int(sorted(sum(v.shape[0] for v in vs) for vs in per_client.values())[len(per_client) // 2]))
        self.pool_ids = [SHADOW_CID + 1 + k for k in range(pool)]
        self.pool_mean = {}
        for c in self.pool_ids:
            d = sim.draw(n, cid=c)
            self.pool_mean[c] = d["control"].mean(0)
        self.n = n

    def draw_cids(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.tensor(self.pool_ids)[torch.randint(0, len(self.pool_ids), (n,), generator=gen)]

    def center_sim(self, control: torch.Tensor, cids: torch.Tensor) -> torch.Tensor:
        return control - torch.stack([self.pool_mean[int(c)] for c in cids])

    def center_real(self, control: torch.Tensor, cid: int) -> torch.Tensor:
        return control - self.real[cid]


def train_inverse(sim: ClientSimulator, steps: int, batch: int, width: int, depth: int, lr: float,
                  branches: str = "both", use_noise: bool = False, centering: OffsetCentering | None = None,
                  seed: int = ATTACK_SEED, loss: str = "mse") -> tuple[InverseNet, dict]:
    """Train the decoder on simulated client features; returns it and a few training statistics."""
    scheduler = sim.scheduler
    inverse = local_inverse(sim.view.base.unet.conv_in, sim.view.base.preset.latent_size)
    gen = torch.Generator().manual_seed(seed + 2)
    torch.manual_seed(seed + 3)

    def sample(n):
        cids = centering.draw_cids(n, gen) if centering is not None else None
        d = sim.draw(n, cid=cids)
        control = centering.center_sim(d["control"], d["cid"]) if centering is not None else d["control"]
        x = decoder_input(control, d["unet"], d["t"], scheduler, branches, d["noise"] if use_noise else None,
                          inverse)
        return x, torch.cat([d["z0"], d["e_hint"]], dim=1)

    x0, y0 = sample(max(batch, 128))
    net = InverseNet(x0.shape[1], y0.shape[1], width, depth)
    net.__dict__["inverse"] = inverse  # fixed and public: kept out of the trained submodules
    net.fit_normaliser(x0)
    err = F.mse_loss if loss == "mse" else F.l1_loss
    return fit_on_stream(net, sample, lambda m, x, y: err(m(x), y), steps, batch, lr)


@torch.no_grad()
def apply_inverse(view: ServerView, net: InverseNet, batches: list[dict], branches: str = "both",
                  use_noise: bool = False, centering: OffsetCentering | None = None, max_samples: int = 64
                  ) -> Reconstruction:
    """Decode every sent batch (up to ``max_samples`` samples) with the trained decoder."""
    ae, C = view.base.autoencoder, view.base.preset.latent_channels
    refs, images, hints = [], [], []
    for b in batches:
        if len(refs) >= max_samples:
            break
        control = centering.center_real(b["control"], b["cid"]) if centering is not None else b["control"]
        x = decoder_input(control, b["unet_features"], b["t"], view.scheduler, branches,
                          b["noise"] if use_noise else None, getattr(net, "inverse", None))
        out = net(x)
        images.append(ae.decode(out[:, :C]).clamp(-1, 1))
        hints.append(signed_to_hint(ae.decode(out[:, C:])))
        refs += [(b["ref"][0], b["ref"][1], j) for j in range(x.shape[0])]
    n = min(max_samples, len(refs))
    return Reconstruction(refs[:n], torch.cat(images)[:n], torch.cat(hints)[:n])


def check_branches(value: str) -> None:
    if value not in ("both", "control", "unet"):
        raise ValueError(f"branches must be one of both, control, unet; got {value!r}")


@register
class InverseNetAttack(Attack):
    """Train a decoder from sent features to images and hints on aux data pushed through the known client model."""

    name = "inverse-net"
    needs = ("sent-features", "aux-data", "white-box-client")
    client_parts = ("frozen", "head")
    why_not = "FedAvg sends no per-step features"
    targets = ("image", "hint")
    params = {"steps": 300, "aux": 512, "width": 24, "depth": 2, "batch": 16, "lr": 0.003,
              "branches": "both", "loss": "mse", "use-noise": False, "max-samples": 64}
    threat_model = ("passive server that knows the client model (public frozen parts; vanilla: the relayed head), "
                    "the public defenses and t, and has auxiliary data; does not use eps")

    def validate(self) -> None:
        check_branches(self.p["branches"])
        if self.p["loss"] not in ("mse", "l1"):
            raise ValueError(f"{self.name}: loss must be mse or l1, got {self.p['loss']!r}")

    def not_applicable(self, view: ServerView) -> str | None:
        reason = super().not_applicable(view)
        if reason is None and self.p["use-noise"] and "noise-target" not in view.available():
            return "use-noise=true needs the noise target eps, which this run's clients do not send"
        return reason

    def run(self, view: ServerView) -> Reconstruction:
        torch.manual_seed(ATTACK_SEED)
        p = self.p
        batches = view.batches()
        info: dict = {"aux": p["aux"], "steps": p["steps"], "t_start": view.defenses.t_start(view.scheduler)}
        heads = None
        if view.client_part == "head":
            heads = attacked_heads(view, batches)
            info["heads_used"] = len(heads)
            info["turn_end_heads_kept"] = len(returned_heads(view))
        aux = view.aux(p["aux"])
        sim = ClientSimulator(view, aux, head=heads)
        centering = OffsetCentering(sim, batches) if offset_used(view.defenses) else None
        info["offset_centering"] = centering is not None
        net, stats = train_inverse(sim, p["steps"], p["batch"], p["width"], p["depth"], p["lr"], p["branches"],
                                   p["use-noise"], centering, loss=p["loss"])
        info.update(stats)
        rec = apply_inverse(view, net, batches, p["branches"], p["use-noise"], centering, p["max-samples"])
        rec.info = info
        return rec
