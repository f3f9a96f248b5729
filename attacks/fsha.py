"""Feature-space hijacking (FSHA, Pasquini, Ateniese and Bernaschi, CCS 2021): an active, malicious server.

Threat model: the server of vanilla split learning deviates from the protocol. Instead
of the gradient of the diffusion loss it returns, for every batch, the gradient of an
adversarial loss that pulls the client's head (hint block + first conv) into the
feature space of a *pilot* network the server owns, whose inverse (a *decoder*) it
trains on public auxiliary data. Once the head is hijacked, the decoder maps the
features the client sends back to its private hint. Needs the cut-layer gradient to
reach the client, so it applies to vanilla split learning only (N/A elsewhere: no
gradient is sent to FedAvg or no-gradient-return clients).

An active attack cannot be replayed from an honest run's transcript: :meth:`FSHA.run`
runs its own short malicious session (``steps`` client batches) against the real
client code (``strategies.vanilla.VanillaClient`` behind ``sim.engine.client_app``'s ClientApp
on an in-process Flower grid, clients built from the run's config, i.e. the same
private data and seeds), records it in its own :class:`sim.engine.transcript.Transcript`
and reconstructs the hints of the last ``attack-batches`` batches. Its refs point into
THAT session's messages, which it returns in ``Reconstruction.info["messages"]`` (the
format of ``seen_<scheme>.pt``; messages before the attacked window keep their
statistics and the names of their fields only, which is all the ground-truth replay
reads); the scorer must take the ground truth from those, not from the view's.

The pieces, adapted to a ControlNet head (conv_in(x_t) + hint block(hint))
-------------------------------------------------------------------------
* the x path: the server knows x_t exactly (the public UNet conv_in is injective: it
  inverts the sent ``unet_features``), so it removes from the gradient it returns every
  component the head's x_t conv could learn from (a least-squares projection per output
  channel, :func:`orthogonal_to_x_path`), scaled down (``grad-max``) so float32 rounding
  stays far below AdamW's eps: that conv then never moves (only weight decay shrinks it,
  which the server models), and ``(features - conv_in(x_t)) / pilot-scale``, centred by
  its spatial median (the background level), is exactly the hint block's output. Critic
  and decoder read that residual.
* pilot: the head at the public initial weights, except that the hint block's
  zero-initialised output conv gets fixed random weights (``pilot-scale``): the client's
  hint block can reach it by moving that conv away from 0 (AdamW moves each weight by
  about lr per step).
* decoder: a 3-layer CNN from the pilot's residual to the hint, trained on aux hints
  before the session (unbounded output, clamped at use: a sigmoid output collapses to
  "all black" on sparse outlines).
* critic: a small strided CNN with the WGAN-GP loss (as in the paper), ``critic-steps``
  updates per client step, telling pilot residuals of aux hints from the client's; the
  client gets the gradient of -critic(residual), i.e. "look like the pilot".
* ``plant``: Plato-style sequential split learning relays the head *through the
  server*, so a malicious server can simply install the pilot as the head at the first
  turn. Off by default (the FSHA threat model does not assume it); on, it measures how
  much worse the relay makes things.

What it reaches (smoke preset, fill50k, batch 4, lr 1e-3, CPU; mean hint SSIM of the
last batches against the blind all-black guess, ~0.55-0.58): 20 steps 0.73 (4 batches,
17 s), 40 steps 0.91, 100 steps 0.97 (the defaults, 8 batches, ~60 s; every sample above
SSIM 0.6). Ablations at 40 steps: without freezing the x path 0.12 (its drift swamps
the hint signal); with 2 or 4 critic steps per client step instead of 8, 0.66 / 0.72
(16: 0.95; these three with grad-max 1e-5); planting the pilot, 0.97 after 20 steps.
Under defenses: symsigmoid + fp16 at 40 steps 0.52-0.61
(fails: fp16 rounding of what the server inverts leaves ~1e-3 of the gradient on the x
path, which AdamW turns into drift); pp-reference 0.00 (its fixed per-client offset on
the control branch is not modelled); latent-dp's noise on the control branch is not
modelled either. ``info`` reports the session length, how far the relayed head ended
from the pilot and how little the x path drifted (both observable by the server), and
the decoder's SSIM on held-out aux data (the attack's ceiling).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from attacks.scoring import image_scores
from defenses.symsigmoid import inverse, symsigmoid
from strategies.base import Channel, turn_schedule
from strategies.vanilla import ControlHead, VanillaReply, VanillaRequest

from .base import Attack, Reconstruction, ServerView, register
from .common import invert_conv


class Decoder(nn.Module):
    """Server's inverse of the pilot's hint path: pilot residual features -> hint in [0, 1] (clamped at use)."""

    def __init__(self, feat_ch: int, out_ch: int = 3, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(feat_ch, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, out_ch, 3, padding=1))

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        return self.net(residual)  # unbounded: a saturating sigmoid collapses to "all black" on sparse hints


class Critic(nn.Module):
    """WGAN critic on residual features (patch scores, averaged)."""

    def __init__(self, feat_ch: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(feat_ch, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(width, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats).mean(dim=(1, 2, 3))


ADAM_WD = 1e-2  # torch.optim.AdamW's default weight decay, which the vanilla client uses


def orthogonal_to_x_path(grad: torch.Tensor, x_t: torch.Tensor, grad_max: float) -> torch.Tensor:
    """The part of a cut-layer gradient that gives the head's x_t path (a 3x3 conv of x_t, known
    to the server exactly) zero weight and bias gradient, rescaled to max |.| = ``grad_max``.

    For each output channel o the conv's gradient is sum_(i,p) grad[i,o,p] * [patch(x_t)_i(p), 1];
    removing grad's projection on the span of those patch columns (least squares, float64)
    makes it 0, so the client's AdamW leaves that conv where it was. The small scale keeps
    float32 rounding on the client far below Adam's eps, which would otherwise turn
    rounding noise into full-size steps.
    """
    b, c, h, w = grad.shape
    patches = F.unfold(x_t.double(), 3, padding=1)  # (B, C_in * 9, H*W)
    X = torch.cat([patches, torch.ones(b, 1, h * w, dtype=torch.float64)], 1).transpose(1, 2).reshape(b * h * w, -1)
    G = grad.double().permute(0, 2, 3, 1).reshape(b * h * w, c)
    coef = torch.linalg.lstsq(X, G).solution
    G = G - X @ coef
    G = G * (grad_max / G.abs().max().clamp_min(1e-300))
    return G.reshape(b, h, w, c).permute(0, 3, 1, 2).float().contiguous()


def centred(r: torch.Tensor) -> torch.Tensor:
    """Features minus their per-sample, per-channel spatial median (the background level: hints are
    mostly 0, and the frozen x path leaves the head no gradient for a constant offset)."""
    return r - r.detach().flatten(2).median(-1).values[..., None, None]


def _light(message: dict) -> dict:
    """A kept message without its payload: statistics, configs and field names (for the replay)."""
    def strip(side: dict) -> dict:
        return {k: ({n: torch.empty(0) for n in v} if k == "tensors" else v) for k, v in side.items()
                if k != "head"}
    return {"stat": message["stat"], "down": strip(message["down"]), "up": strip(message["up"]),
            "payload_dropped": True}


@register
class FSHA(Attack):
    """Malicious vanilla server: adversarial gradients pull the client's head to a pilot; a decoder inverts it."""

    name = "fsha"
    needs = ("gradients-to-client", "active-server", "aux-data")
    client_parts = ("head",)
    why_not = "needs gradients sent to the client"
    targets = ("hint",)
    active = True
    params = {"steps": 100, "attack-batches": 8, "aux": 512, "pretrain": 150, "critic-steps": 8,
              "gp": 10.0, "lr-server": 3e-3, "pilot-scale": 0.05, "freeze-x-path": True, "grad-max": 1e-8,
              "plant": False, "seed": 0}
    threat_model = ("malicious vanilla split-learning server that returns adversarial gradients (and, with "
                    "plant, installs a head of its choice through the relay); public aux data")

    def not_applicable(self, view: ServerView) -> str | None:
        if view.client_part not in self.client_parts:
            return self.why_not
        if view.connect is None:
            return "needs a session with the clients (an active server); this view offers none"
        return None  # the attack makes its own session: it needs no kept messages from the view

    # ------------------------------------------------------------------ the attack
    def run(self, view: ServerView) -> Reconstruction:
        p = self.p
        torch.manual_seed(p["seed"])
        gen = torch.Generator().manual_seed(p["seed"] + 1)
        aux = view.aux(p["aux"])["condition"]
        n_hold = max(8, len(aux) // 8)
        held, train = aux[:n_hold], aux[n_hold:]

        pilot = ControlHead(view.controlnet_init).requires_grad_(False)
        w = pilot.controlnet_cond_embedding.conv_out.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(p["seed"] + 2)) * p["pilot-scale"])
        self.pilot, self.scale, self.lr = pilot, p["pilot-scale"], view.cfg.lr
        self.symsigmoid = "symsigmoid" in [d.name for d in view.defenses.defenses]
        feat_ch = w.shape[0]
        decoder, critic = Decoder(feat_ch), Critic(feat_ch)

        def real(n: int, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            hint = pool[torch.randint(0, len(pool), (n,), generator=gen)]
            with torch.no_grad():
                return centred(pilot.controlnet_cond_embedding(hint) / self.scale), hint

        opt_dec = torch.optim.Adam(decoder.parameters(), lr=p["lr-server"])
        for _ in range(p["pretrain"]):
            r, hint = real(16, train)
            loss = F.mse_loss(decoder(r), hint)
            opt_dec.zero_grad(set_to_none=True)
            loss.backward()
            opt_dec.step()
        with torch.no_grad():
            r, hint = real(len(held), held)
            ceiling = image_scores(decoder(r).clamp(0, 1), hint, signed=False)["ssim"]

        kept, heads = self._session(view, critic, lambda n: real(n, train)[0])

        refs, hints = [], []
        for i, m in enumerate(kept):
            up = m["up"].get("tensors", {})
            if m.get("payload_dropped") or "control_features" not in up:
                continue
            with torch.no_grad():
                r = self._residual(up["control_features"].float(), up["unet_features"].float(), view,
                                   m["stat"]["first_step"])
                hints.append(decoder(r).clamp(0, 1))
            refs += [(i, 0, j) for j in range(r.shape[0])]
        ps = pilot.state_dict()
        last = heads[-1]
        dist = (sum(float((last[k].float() - ps[k]).pow(2).sum()) for k in ps)
                / sum(float(ps[k].pow(2).sum()) for k in ps)) ** 0.5
        hint_part = (sum(float((last[k].float() - ps[k]).pow(2).sum()) for k in ps if "cond_embedding" in k)
                     / sum(float(ps[k].pow(2).sum()) for k in ps if "cond_embedding" in k)) ** 0.5
        decay = (1 - self.lr * ADAM_WD) ** p["steps"] if p["freeze-x-path"] else 1.0
        x_drift = (sum(float((last[k].float() - decay * ps[k]).pow(2).sum()) for k in ps if k.startswith("conv_in"))
                   / sum(float(ps[k].pow(2).sum()) for k in ps if k.startswith("conv_in"))) ** 0.5
        info = {"session_steps": p["steps"], "x_path_rel_drift": round(x_drift, 6), "session_messages": len(kept),
                "planted": bool(p["plant"]),
                "head_to_pilot_rel_dist": round(dist, 4), "hint_block_to_pilot_rel_dist": round(hint_part, 4),
                "decoder_aux_ssim": round(ceiling, 4), "messages": kept}
        return Reconstruction(refs, hints=torch.cat(hints), info=info)

    def _residual(self, control: torch.Tensor, unet_features: torch.Tensor, view: ServerView,
                  step: int) -> torch.Tensor:
        """What the hint contributes to the sent features if the head were the pilot:
        (features - pilot.conv_in(x_t)) / pilot-scale, x_t solved exactly from the public UNet branch."""
        if self.symsigmoid:
            control = inverse(control)
        x_t = invert_conv(view.base.unet.conv_in, unet_features)
        return centred((control - self._x_path(x_t, step)) / self.scale)

    def _session(self, view, critic, real):
        """The malicious vanilla session; returns (kept messages, heads the clients returned)."""
        p, cfg = self.p, view.cfg
        steps, window = p["steps"], p["attack-batches"]
        kept: list[dict] = []

        def keep(m: dict) -> None:  # full payloads only for the attacked window
            stat = m["stat"]
            kept.append(m if stat["num_steps"] and stat["first_step"] >= steps - window else _light(m))

        grid, node_ids = view.connect(keep)  # a fresh session with the run's clients
        channel = Channel(grid, node_ids, view.strategy.message_type)
        opt = torch.optim.Adam(critic.parameters(), lr=p["lr-server"], betas=(0.5, 0.9))
        head_state = (copy.deepcopy(self.pilot.state_dict()) if p["plant"]
                      else ControlHead(view.controlnet_init).state_dict())
        done, heads = 0, []
        for turn, (cid, k) in enumerate(turn_schedule(steps, cfg.num_clients, cfg.local_steps), start=1):
            request = VanillaRequest(head=head_state)
            for _ in range(k):
                reply = channel.call(cid, request, VanillaReply, steps=(done, 1), round=turn)
                sent = reply.control_features.float().requires_grad_(True)
                fake = self._residual_differentiable(sent, reply.unet_features.float(), view, done)
                for _ in range(p["critic-steps"]):
                    r = real(fake.shape[0])
                    loss = critic(fake.detach()).mean() - critic(r).mean() + p["gp"] * self._penalty(critic, r, fake)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                (-critic(fake).mean()).backward()  # "look like the pilot": the gradient the client gets
                grad = sent.grad.detach()
                if p["freeze-x-path"]:  # in the head's output space, i.e. before the client's symsigmoid
                    grad = orthogonal_to_x_path(grad * self._slope, self._x_t, p["grad-max"]) / self._slope
                request = VanillaRequest(control_features_grad=grad)
                done += 1
            request.want_batch = False
            reply = channel.call(cid, request, VanillaReply, steps=(done, 0), round=turn)
            head_state = reply.head  # relayed honestly (planting, if any, happened at the first turn)
            heads.append(reply.head)
        return kept, heads

    def _residual_differentiable(self, sent: torch.Tensor, unet_features: torch.Tensor, view,
                                 step: int) -> torch.Tensor:
        """:meth:`_residual` as a differentiable function of the sent features (symsigmoid: through its
        inverse, whose derivative is 1 / symsigmoid'(x))."""
        self._x_t = x_t = invert_conv(view.base.unet.conv_in, unet_features)
        self._slope = torch.ones_like(sent)  # d sent / d head output
        if self.symsigmoid:
            pre = inverse(sent.detach()).requires_grad_(True)
            (slope,) = torch.autograd.grad(symsigmoid(pre).sum(), pre)
            self._slope = slope.clamp_min(1e-6)
            sent = pre.detach() + (sent - sent.detach()) / self._slope  # value pre, gradient 1/slope
        return centred((sent - self._x_path(x_t, step)) / self.scale)

    def _x_path(self, x_t: torch.Tensor, step: int) -> torch.Tensor:
        """The client head's x_t path, ``conv_in(x_t)``, as the server predicts it after ``step`` client steps:
        the public initial conv, shrunk by AdamW's decoupled weight decay when the x path is frozen
        (zero gradient: Adam leaves it alone, the decay does not)."""
        decay = (1 - self.lr * ADAM_WD) ** step if self.p["freeze-x-path"] else 1.0
        return decay * self.pilot.conv_in(x_t)

    @staticmethod
    def _penalty(critic, real_f, fake_f) -> torch.Tensor:
        """WGAN-GP gradient penalty on interpolates."""
        a = torch.rand(real_f.shape[0], 1, 1, 1)
        mix = (a * real_f + (1 - a) * fake_f.detach()).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(mix).sum(), mix, create_graph=True)
        return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
