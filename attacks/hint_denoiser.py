"""Learned hint recovery: denoise the algebraic per-release hint estimate of nograd's control branch.

Needs: the sent features (both branches) of the no-gradient-return scheme, white-box
knowledge of the public client (autoencoder, ``unet.conv_in``, the public defense stack:
Kerckhoffs) and public auxiliary hints. Passive, honest-but-curious server. The noise
target eps, where it is sent, is used only as a side input (the z0 estimate below).

1. Algebraic estimate, per release (what noise-target does for the hint): invert the
   public ``conv_in`` for the unet branch's input x (an exact local inverse); undo the control
   branch's public transforms in reverse order (symsigmoid inverted; a fixed per-client
   offset estimated as the per-pixel median, over that client's releases, of what was sent
   minus the pipeline applied to a black hint; local-dp's clipping factor estimated per
   release by least squares against the black-hint pipeline); subtract x: E(hint) plus
   whatever noise a defense put on the control branch and not on the unet branch (noise,
   local-dp; a latent defense whose branches read different draws); decode.
2. Train a small conv denoiser (a stride-2 level of dilated residual convs, CPU-cheap;
   binary cross-entropy, as edge hints are sparse) from that estimate -- with a robust
   per-release noise-level plane and, where the noise target is sent, the unet branch's z0
   estimate (``DefenseStack.estimate_z0``; the private image carries its own edges) -- to the
   clean hint, on public auxiliary hints pushed through the same public client pipeline
   (:func:`defenses.client_release` with the run's public stack) with the server's own random
   draws for the client's private noise, and shadow clients for a per-client offset (estimated
   the same way, from as many releases as a real client sent).
3. Pick the output rule (the algebraic estimate as is, the denoiser's probabilities, or those
   binarised at a threshold) by SSIM on fresh simulated releases, and apply it to every sent
   release.

This is the general form of "fit a circle to the noisy control branch": the denoiser learns
the auxiliary data's hint prior (circle outlines, face edges) instead of a hand-made model.
Vanilla is out of scope: there the control branch is the trained head's output
conv_in(x) + cond_embedding(hint), with no algebraic hint estimate to denoise (inverse-net
and rmle invert the head).
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from defenses import HookContext, client_release
from defenses.local_dp import clip_per_sample
from defenses.symsigmoid import inverse, symsigmoid
from sim.core.cuts import nograd_control_input

from .base import Attack, Reconstruction, ServerView, register
from .common import fit_on_stream, signed_to_hint
from .inverse_net import SHADOW_CID, local_inverse
from .scoring import image_scores

ATTACK_SEED = 24_601  # the attacker's own randomness (aux draws, t, noise, the simulated private noise)
SHADOW_POOL = 16  # shadow clients whose offsets (if any) the training stream draws
Z0_CLAMP = 4.0  # |z0 estimate| is clamped: dividing by sqrt(abar_t) at high t amplifies rounding


# ----------------------------------------------------------------------------- the algebraic estimate
def control_ops(stack) -> list:
    """The public feature-hook transforms of the control branch, in the order the client applies them."""
    ops = []
    for d in stack.with_hook("feature"):
        if d.name == "symsigmoid":
            ops.append(("symsigmoid", d))
        elif d.name == "fp16" and d.p.get("offset"):
            ops.append(("offset", d))
        elif d.name == "local-dp":
            ops.append(("clip", d))
        # noise (zero mean) and anything else not invertible: left in the estimate for the denoiser
    return ops


def _forward(ops: list, v: torch.Tensor) -> torch.Tensor:
    """The deterministic part of ``ops`` applied to ``v`` (noise omitted; offsets not applied)."""
    for kind, d in ops:
        if kind == "symsigmoid":
            v = symsigmoid(v)
        elif kind == "clip":
            v = clip_per_sample(v, d.clip_norm(v))
    return v


def _clip_scale(v: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample least-squares scale s of v ~ s ref (local-dp's clip factor, with ref = the black-hint input)."""
    s = (v * ref).flatten(1).sum(1) / (ref * ref).flatten(1).sum(1).clamp_min(1e-12)
    return s.clamp(1e-3, 1.0).view(-1, *([1] * (v.ndim - 1)))


class HintEstimator:
    """Step 1, shared by the simulated and the real releases (so the denoiser sees the same statistic)."""

    def __init__(self, view: ServerView):
        self.view = view
        self.ae = view.base.autoencoder
        self.inv = local_inverse(view.base.unet.conv_in, view.base.preset.latent_size)
        self.ops = control_ops(view.defenses)
        p = view.base.preset
        with torch.no_grad():
            self.e_black = self.ae.encode(-torch.ones(1, 3, p.image_size, p.image_size))  # E(black hint)

    @property
    def has_offset(self) -> bool:
        return any(k == "offset" for k, _ in self.ops)

    def unet_x(self, unet_features: torch.Tensor) -> torch.Tensor:
        return self.inv(unet_features.float())

    def _undo(self, control: torch.Tensor, x: torch.Tensor, offset: torch.Tensor | None, upto_offset: bool = False):
        """Undo the control ops in reverse order; with ``upto_offset`` stop just before the offset (its input)."""
        v = control.float()
        ref = self.e_black + x
        for i in range(len(self.ops) - 1, -1, -1):
            kind, _ = self.ops[i]
            if kind == "offset":
                if upto_offset:
                    return v, i
                v = v - (offset if offset is not None else 0)
            elif kind == "symsigmoid":
                v = inverse(v)
            elif kind == "clip":
                v = v / _clip_scale(v, _forward(self.ops[:i], ref))
        return v, None

    @torch.no_grad()
    def offset(self, control: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A client's fixed offset from its releases: per-pixel median of (sent, undone down to the offset)
        minus the pipeline before the offset applied to a black hint (hints are mostly black)."""
        v, i = self._undo(control, x, None, upto_offset=True)
        return (v - _forward(self.ops[:i], self.e_black + x)).median(dim=0).values

    @torch.no_grad()
    def estimate(self, control: torch.Tensor, x: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """E(hint) estimate (latent): the control branch undone, minus the unet branch's x."""
        v, _ = self._undo(control, x, offset)
        return v - x


def noise_level(img: torch.Tensor) -> torch.Tensor:
    """A robust per-sample noise std (median absolute neighbour difference / 0.6745 / sqrt 2) as a plane."""
    d = torch.cat([(img[..., 1:, :] - img[..., :-1, :]).flatten(1), (img[..., :, 1:] - img[..., :, :-1]).flatten(1)], 1)
    s = d.abs().median(dim=1).values / (0.6745 * math.sqrt(2))
    return s.view(-1, 1, 1, 1).expand(-1, 1, *img.shape[-2:])


@torch.no_grad()
def denoiser_input(est: HintEstimator, control, unet_features, t, target, offset) -> torch.Tensor:
    """What the denoiser reads for a batch of releases: the decoded hint estimate, its noise level and,
    where the noise target is sent, the decoded z0 estimate of the unet branch (image resolution)."""
    view, ae = est.view, est.ae
    x = est.unet_x(unet_features)
    img = ae.decode(est.estimate(control, x, offset))
    parts = [img, noise_level(img)]
    if target is not None:
        z0 = view.defenses.estimate_z0(x, t, target.float(), view.scheduler)[0]
        parts.append(ae.decode(z0.clamp(-Z0_CLAMP, Z0_CLAMP)))
    size = img.shape[-2:]
    return torch.cat([p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="nearest") for p in parts], 1)


# ----------------------------------------------------------------------------- the simulated client
class PipelineSimulator:
    """nograd's client on auxiliary data through the public stack, with the server's own draws for the private
    noise; returns what a release carries (control, unet features, t, target) and the clean hint."""

    def __init__(self, view: ServerView, aux: dict, seed: int = ATTACK_SEED):
        self.view, self.aux, self.stack, self.scheduler = view, aux, view.defenses, view.scheduler
        self.gen = torch.Generator().manual_seed(seed)
        self.defense_gen = torch.Generator().manual_seed(seed + 1)
        self.t_start = self.stack.t_start(view.scheduler)
        self.T = view.scheduler.config.num_train_timesteps

    @torch.no_grad()
    def draw(self, n: int, cid: int | torch.Tensor = SHADOW_CID) -> dict:
        base = self.view.base
        idx = torch.randint(0, len(self.aux["target"]), (n,), generator=self.gen)
        z0 = base.autoencoder.encode(self.aux["target"][idx])
        hint = self.aux["condition"][idx]
        t = torch.randint(self.t_start, self.T, (n,), generator=self.gen, dtype=torch.int64)
        noise = torch.randn(z0.shape, generator=self.gen)
        x_t = self.scheduler.add_noise(z0, noise, t)
        cids = cid if isinstance(cid, torch.Tensor) else torch.full((n,), int(cid))
        parts, order = [], []
        for c in cids.unique().tolist():  # a per-client offset depends on the (shadow) client
            sel = (cids == c).nonzero().flatten()
            ctx = HookContext(t[sel], self.scheduler, int(c), self.defense_gen, secret=ATTACK_SEED * 1_000 + int(c),
                              z0=z0[sel], idx=idx[sel], noise=noise[sel])
            parts.append(client_release(self.stack, lambda x, s=sel: nograd_control_input(
                base.autoencoder, x, hint[s]), base.unet, x_t[sel], ctx))
            order.append(sel)
        back = torch.cat(order).argsort()
        cat = lambda key: torch.cat([getattr(r, key).float() for r in parts])[back]
        # t and target as sent: the batch's own unless the latent defense changes them
        return {"control": cat("control"), "unet": cat("unet_features"), "t": torch.cat([r.t for r in parts])[back],
                "target": cat("target"), "hint": hint, "cid": cids}


# ----------------------------------------------------------------------------- the denoiser
class HintDenoiser(nn.Module):
    """A small two-level conv net: a full-resolution 3x3 conv, a stride-2 level of dilated residual 3x3 convs
    (receptive field ~ the whole 32x32 hint), back up with a skip; logits of the hint in [0, 1]."""

    def __init__(self, in_ch: int, width: int = 16, dilations: tuple[int, ...] = (1, 2, 4, 1)):
        super().__init__()
        w, w2 = width, 2 * width
        self.register_buffer("mean", torch.zeros(1, in_ch, 1, 1))
        self.register_buffer("std", torch.ones(1, in_ch, 1, 1))
        self.inp = nn.Conv2d(in_ch, w, 3, padding=1)
        self.down = nn.Conv2d(w, w2, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.GELU(), nn.Conv2d(w2, w2, 3, padding=d, dilation=d))
                                    for d in dilations)
        self.up = nn.Sequential(nn.Conv2d(w2 + w, w, 3, padding=1), nn.GELU())
        self.out = nn.Conv2d(w, 3, 3, padding=1)

    def fit_normaliser(self, x: torch.Tensor) -> None:
        self.mean.copy_(x.mean(dim=(0, 2, 3), keepdim=True))
        self.std.copy_(x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h0 = F.gelu(self.inp((x - self.mean) / self.std))
        h = self.down(h0)
        for b in self.blocks:
            h = h + b(h)
        return self.out(self.up(torch.cat([h0, F.interpolate(h, size=h0.shape[-2:], mode="nearest")], dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


RULES = ("algebraic", "probability", 0.3, 0.4, 0.5, 0.6, 0.7)  # a number: probabilities binarised there


def apply_rule(net: HintDenoiser, x: torch.Tensor, rule) -> torch.Tensor:
    """The hint under an output rule: the algebraic estimate itself (channels 0-2 of the input), the denoiser's
    probabilities, or those binarised at a threshold."""
    if rule == "algebraic":
        return signed_to_hint(x[:, :3])
    prob = net(x)
    return prob if rule == "probability" else (prob > rule).float()


@torch.no_grad()
def calibrate(net: HintDenoiser, sample, n: int = 192):
    """The output rule with the best mean SSIM on fresh simulated releases (public data only). Where the
    denoiser is unsure, probabilities put grey on a black background, which costs SSIM that a threshold
    keeps; where the estimate is exact already (no noise on the control branch), it is returned as is."""
    x, y = sample(n)
    score = {r: image_scores(apply_rule(net, x, r), y, signed=False)["ssim"] for r in RULES}
    return max(score, key=score.get)


@register
class HintDenoiserAttack(Attack):
    """Denoise nograd's algebraic hint estimate (control minus inverted unet branch) with a net trained on aux hints."""

    name = "hint-denoiser"
    needs = ("sent-features", "white-box-client", "aux-data")
    client_parts = ("frozen",)
    why_not = ("needs nograd's control branch E(hint) + x; vanilla's is the trained head's conv_in(x) + "
               "cond_embedding(hint), with no algebraic hint estimate (inverse-net and rmle invert the head); "
               "FedAvg sends no per-step features")
    targets = ("hint",)
    params: ClassVar[dict] = {"aux": 512, "steps": 400, "batch": 32, "width": 16, "lr": 0.003, "use-z0": True,
              "max-samples": 64}
    threat_model = ("passive server that knows the public client (autoencoder, conv_in), the public defenses and "
                    "has auxiliary hints; simulates the client's private noise with its own draws")

    def run(self, view: ServerView) -> Reconstruction:
        p = self.p
        torch.manual_seed(ATTACK_SEED)
        sample, real, info = releases(view, p["aux"], p["max-samples"], p["use-z0"])
        net, stats = train_denoiser(sample, p["steps"], p["batch"], p["width"], p["lr"])
        rule = calibrate(net, sample)
        info.update(aux=p["aux"], steps=p["steps"], output_rule=rule, **stats)
        with torch.no_grad():
            hints = torch.cat([apply_rule(net, x, rule) for _, x in real]) if real else None
        refs = [r for rs, _ in real for r in rs]
        return Reconstruction(refs, hints=hints, info=info)


def releases(view: ServerView, aux: int, max_samples: int, use_z0: bool = True):
    """The denoiser's training stream and the real releases' inputs.

    Returns ``(sample, real, info)``: ``sample(n)`` draws n simulated releases (denoiser input, clean hint);
    ``real`` lists (refs, denoiser input) per sent batch, up to ``max_samples`` samples."""
    est = HintEstimator(view)
    batches = view.batches()
    with_target = use_z0 and bool(batches) and batches[0]["noise"] is not None
    sim = PipelineSimulator(view, view.aux(aux))
    info: dict = {"ops_undone": [k for k, _ in est.ops], "z0_side_input": with_target}

    # a per-client offset: each real client's from its own releases; shadow clients' from as many
    real_offsets, pool = {}, {}
    if est.has_offset:
        per: dict[int, list] = {}
        for b in batches:
            per.setdefault(b["cid"], []).append(b)
        for c, bs in per.items():
            real_offsets[c] = est.offset(torch.cat([b["control"] for b in bs]),
                                         est.unet_x(torch.cat([b["unet_features"] for b in bs])))
        n = max(1, sorted(sum(b["control"].shape[0] for b in bs) for bs in per.values())[len(per) // 2])
        for k in range(SHADOW_POOL):
            c = SHADOW_CID + 1 + k
            d = sim.draw(n, cid=c)
            pool[c] = est.offset(d["control"], est.unet_x(d["unet"]))
        info["offset_estimated_from"] = n
    pool_ids = torch.tensor(sorted(pool)) if pool else None
    gen = torch.Generator().manual_seed(ATTACK_SEED + 2)

    def sample(n: int):
        cids = pool_ids[torch.randint(0, len(pool_ids), (n,), generator=gen)] if pool_ids is not None else SHADOW_CID
        d = sim.draw(n, cid=cids)
        off = torch.stack([pool[int(c)] for c in d["cid"]]) if pool else None
        return denoiser_input(est, d["control"], d["unet"], d["t"], d["target"] if with_target else None,
                              off), d["hint"]

    real, count = [], 0
    for b in batches:
        if count >= max_samples:
            break
        k = min(b["control"].shape[0], max_samples - count)
        x = denoiser_input(est, b["control"][:k], b["unet_features"][:k], b["t"][:k],
                           b["noise"][:k] if with_target else None, real_offsets.get(b["cid"]))
        real.append(([(b["ref"][0], b["ref"][1], j) for j in range(k)], x))
        count += k
    return sample, real, info


def train_denoiser(sample, steps: int, batch: int, width: int, lr: float, seed: int = ATTACK_SEED):
    """Fit the denoiser on the simulated stream (BCE to the clean hint); returns it and training statistics."""
    torch.manual_seed(seed + 3)
    x0, _ = sample(max(128, batch))
    net = HintDenoiser(x0.shape[1], width)
    net.fit_normaliser(x0)
    # BCE on the logits: no vanishing gradient on sparse edges
    return fit_on_stream(net, sample, lambda m, x, y: F.binary_cross_entropy_with_logits(m.logits(x), y),
                         steps, batch, lr)
