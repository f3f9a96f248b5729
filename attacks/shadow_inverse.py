"""Learning-based inversion through a shadow client model (He et al. 2019; the paper's second effective attack).

Threat model: a passive, honest-but-curious server that does NOT know the client's
trained model: under vanilla split learning the head (``controlnet_cond_embedding`` +
``conv_in``) is private and trained by the client; this attack deliberately ignores the
head weights relayed in the transcript (inverse-net uses those). It knows the public
initial ControlNet (so the head's architecture and initialisation), its own trained
ControlNet part, the frozen public UNet, the public defense stack and recipe, t, and has
auxiliary data. It does not use the noise target eps for reconstruction (only as the
diffusion loss's target on its own auxiliary data, where it draws eps itself).

1. Shadow client: a head initialised from ``view.controlnet_init``'s head modules, trained on
   auxiliary data with the diffusion loss through the server's own final ControlNet part and
   the UNet (both frozen), through the public defense pipeline -- the same objective the real
   head was trained for, so the shadow's features come to play the role the real ones play
   for the server's part.
2. Inverse network (as in inverse-net) trained on the shadow's features, applied to the real
   sent features.

Params: ``shadow-steps``, ``shadow-batch``, ``shadow-lr`` (0: the run's public lr) for step 1;
``steps``, ``aux``, ``width``, ``depth``, ``batch``, ``lr``, ``branches`` as in inverse-net.

Under nograd the client holds only public, frozen parts (E and ``unet.conv_in``, no trainable
weights): a shadow of it is the model itself, so the attack would be inverse-net exactly; it
is reported N/A there with that reason rather than as a duplicate row.

What it can reach: the image only through the UNet branch (public conv_in of x_t: as in
inverse-net); the hint only as far as the shadow's hint embedding matches the real one up to
what the decoder can absorb. Two heads trained from the same init on the same objective need
not agree (the server part is trained against the real head; the shadow may find another
embedding), which is the gap this attack measures against inverse-net.
"""
from __future__ import annotations

import copy

import torch

from sim.core.cuts import control_rest, unet_rest
from strategies.base import TrainSettings, diffusion_loss
from strategies.vanilla import ControlHead

from .base import Attack, Reconstruction, ServerView, register
from .inverse_net import (
    ATTACK_SEED,
    ClientSimulator,
    OffsetCentering,
    apply_inverse,
    check_branches,
    offset_used,
    train_inverse,
)


def train_shadow_head(view: ServerView, aux: dict, steps: int, batch: int, lr: float) -> tuple[torch.nn.Module, dict]:
    """A head from the public init, trained through the server's frozen ControlNet part and UNet on aux data."""
    cfg, base, sched = view.cfg, view.base, view.scheduler
    server_part = copy.deepcopy(view.controlnet_final).eval().requires_grad_(False)  # its head modules go unused
    head = ControlHead(view.controlnet_init).train().requires_grad_(True)
    settings = TrainSettings.from_config(cfg)
    stack = view.defenses
    with torch.no_grad():
        null = base.encode_prompts([""])
        if stack.sends_prompt:
            prompts = aux["prompt"]
            ctx_all = torch.cat([base.encode_prompts(prompts[i:i + 64]) for i in range(0, len(prompts), 64)])
        else:  # the clients keep prompts home: the server's part always saw the empty prompt
            ctx_all = null.expand(len(aux["prompt"]), *null.shape[1:])
    gen = torch.Generator().manual_seed(ATTACK_SEED + 7)
    sim = ClientSimulator(view, aux, head=head, seed=ATTACK_SEED + 8)
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        d = sim.draw(batch, head=head, grad=True)
        context = ctx_all[d["idx"]]
        if cfg.prompt_dropout > 0 and stack.sends_prompt:
            drop = torch.rand(batch, generator=gen) < cfg.prompt_dropout
            context = torch.where(drop.view(-1, 1, 1), null.expand_as(context), context)
        down, mid = control_rest(server_part, d["control"], d["t"], context)
        eps_hat = unet_rest(base.unet, d["unet"].detach(), d["t"], context, down, mid)
        loss = diffusion_loss(eps_hat, d["noise"], d["t"], sched, settings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    head.eval().requires_grad_(False)
    k = max(1, len(losses) // 5)
    return head, {"shadow_loss_first": round(sum(losses[:k]) / k, 4) if losses else None,
                  "shadow_loss_last": round(sum(losses[-k:]) / k, 4) if losses else None}


@register
class ShadowInverseAttack(Attack):
    """Train a shadow of the private client head on aux data, then a decoder on its features; apply to the sent ones."""

    name = "shadow-inverse"
    needs = ("sent-features", "aux-data")
    client_parts = ("head",)
    why_not = ("FedAvg sends no per-step features; under nograd the client holds only public frozen parts, so "
               "the shadow model is the client model itself: see inverse-net")
    targets = ("image", "hint")
    params = {"shadow-steps": 100, "shadow-batch": 8, "shadow-lr": 0.0, "steps": 300, "aux": 512, "width": 24,
              "depth": 2, "batch": 16, "lr": 0.003, "branches": "both", "max-samples": 64}
    threat_model = ("passive server that does not know the client's trained head; knows its init, the server's own "
                    "ControlNet part, the public defenses and t; has auxiliary data; does not use eps")

    def validate(self) -> None:
        check_branches(self.p["branches"])

    def not_applicable(self, view: ServerView) -> str | None:
        if view.client_part == "whole":
            return "FedAvg sends no per-step features"
        if view.client_part == "frozen":
            return ("the nograd client holds only public frozen parts (E, unet.conv_in): a shadow of it is the "
                    "client model itself, so this attack is inverse-net there")
        reason = super().not_applicable(view)
        if reason is None and view.controlnet_final is None:
            return "needs the server's trained ControlNet part (controlnet_<scheme> of the run), absent"
        return reason

    def run(self, view: ServerView) -> Reconstruction:
        torch.manual_seed(ATTACK_SEED)
        p = self.p
        batches = view.batches()
        aux = view.aux(p["aux"])
        lr = p["shadow-lr"] or view.cfg.lr
        head, info = train_shadow_head(view, aux, p["shadow-steps"], p["shadow-batch"], lr)
        sim = ClientSimulator(view, aux, head=[head])
        centering = OffsetCentering(sim, batches) if offset_used(view.defenses) else None
        with torch.no_grad():  # how far the shadow's control features are from the real ones, in distribution
            real = torch.cat([b["control"] for b in batches])
            fake = sim.draw(min(256, 4 * real.shape[0]))["control"]
            dims = (0, 2, 3)
            gap = ((real.mean(dims) - fake.mean(dims)).norm() + (real.std(dims) - fake.std(dims)).norm()
                   ) / real.std(dims).norm().clamp_min(1e-8)
        info.update({"aux": p["aux"], "shadow_steps": p["shadow-steps"], "steps": p["steps"],
                     "feature_stat_gap": round(float(gap), 4), "offset_centering": centering is not None})
        net, stats = train_inverse(sim, p["steps"], p["batch"], p["width"], p["depth"], p["lr"], p["branches"],
                                   False, centering)
        info.update(stats)
        rec = apply_inverse(view, net, batches, p["branches"], False, centering, p["max-samples"])
        rec.info = info
        return rec
