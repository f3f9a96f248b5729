"""Multi-release linking: find the releases of one private record among a client's batches, combine them.

Batches are drawn with replacement, so a record is sent many times, each time with fresh
diffusion noise and (under a latent defense) fresh client-private noise. The server does not
know which releases belong together; it links them from what it sees, within one client:

* the control branch: under a frozen client (nograd) it carries E(hint) + x at full scale,
  so after undoing the public wire transforms (a fixed per-client offset estimated as the
  per-pixel median over the client's batches, symsigmoid inverted) and subtracting the
  inverted unet-branch input x, what is left is E(hint) (minus E(black), the same for every
  release): a per-record fingerprint that no latent defense touches. Under a head client
  (vanilla) the same subtraction of the relayed head's ``conv_in(x)`` leaves the hint
  embedding of the head;
* the z0 estimates themselves (``DefenseStack.estimate_z0``): exact without a latent defense,
  distance corrected for the private noise's known variance otherwise;
* the text context, as a cannot-link: two releases with different non-empty contexts are
  different records (prompt dropout replaces a record's prompt by "", never by another).

The linking thresholds come from the data, not from constants: public auxiliary records go
through the public client pipeline (the run's defense stack with the attacker's own
randomness and secret, the public timestep policy), twice each, and per channel the
threshold minimises the expected missed links + ``false-link-cost`` x false links among the
client's releases (rates on the simulated same- and different-record pairs, weighted by how many
of each a client's releases hold: about m - 1 different-record pairs per same-record pair for m
records per client, public as num-samples / num-clients). Releases are then grouped by complete linkage
(every pair in a group linked, no cannot-link).

Each group's z0 estimates are combined by inverse-variance weighting (the per-release residual
std from ``estimate_z0``) and decoded with the public autoencoder; its hint estimates (frozen
client) are averaged. Every kept sample gets its group's reconstruction. The group's residual
std accounts for noise shared by its releases (one-shot releases every record with the same
noise: averaging its releases removes nothing).

Needs: sent features, the noise target and t, the public client parts (white box). Passive,
honest-but-curious server; auxiliary data only to calibrate the linking.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from attacks.inverse_net import head_for, returned_heads, vanilla_heads
from defenses import DefenseStack, HookContext, client_release
from defenses.symsigmoid import inverse, symsigmoid
from sim.core.cuts import control_head, nograd_control_input
from sim.core.diffusion import noisy_latents, sample_timesteps

from .base import Attack, Reconstruction, ServerView, register
from .common import invert_conv, signed_to_hint

CHANNELS = ("hint", "z0")


# ----------------------------------------------------------------------------- per-release estimates
def _wire_names(stack: DefenseStack) -> tuple[bool, bool]:
    """(symsigmoid acts on the control branch, fp16 adds a fixed per-client offset)."""
    names = [d.name for d in stack.defenses]
    offset = any(d.name == "fp16" and d.p.get("offset") for d in stack.defenses)
    return "symsigmoid" in names, offset


def _background(view: ServerView, x: torch.Tensor, head) -> torch.Tensor:
    """The client's control branch for an all-black hint: E(black) + x (frozen) or head(x, black)."""
    size = view.base.preset.image_size
    black = torch.zeros(x.shape[0], 3, size, size)
    if head is None:
        return nograd_control_input(view.base.autoencoder, x, black)
    return control_head(head, x, black)


@torch.no_grad()
def release_estimates(view: ServerView, batches: list[dict], heads: list | None = None, iters: int = 300,
                      stack: DefenseStack | None = None) -> dict:
    """Per sample of ``batches`` (dicts as :meth:`ServerView.batches` gives them): the z0 estimate and its
    residual std (``estimate_z0``), the hint fingerprint from the control branch, the hint estimate
    E(hint) (frozen client), the client id, the sent timestep and a prompt key (-1: no or empty context).

    ``heads``: the head module per batch for a head client (None: the frozen client's E(hint) + x)."""
    stack = view.defenses if stack is None else stack
    conv = view.base.unet.conv_in
    sym, offset_used = _wire_names(stack)
    xs, z0s, stds, controls, backs = [], [], [], [], []
    for k, b in enumerate(batches):
        x = invert_conv(conv, b["unet_features"], iters)
        z0, std = stack.estimate_z0(x, b["t"], b["noise"], view.scheduler)
        xs.append(x)
        z0s.append(z0.float())
        stds.append(std.float().reshape(-1).expand(x.shape[0]))
        controls.append(b["control"].float())
        backs.append(_background(view, x, heads[k] if heads is not None else None))
    cids = torch.cat([torch.full((len(x),), int(b["cid"])) for b, x in zip(batches, xs)])
    control, back = torch.cat(controls), torch.cat(backs)
    if offset_used:  # per-pixel median of what was sent minus f(background), per client
        forward = symsigmoid if sym else (lambda e: e)
        for c in cids.unique().tolist():
            m = cids == c
            control[m] = control[m] - (control[m] - forward(back[m])).median(dim=0).values
    e = inverse(control) if sym else control
    fingerprint = e - back  # frozen: E(hint) - E(black); head: the head's hint embedding (minus that of black)
    hint = None
    if heads is None:
        size = view.base.preset.image_size
        e_black = view.base.autoencoder.encode(-torch.ones(1, 3, size, size))
        hint = fingerprint + e_black
    return {"z0": torch.cat(z0s), "std": torch.cat(stds), "fingerprint": fingerprint, "e_hint": hint,
            "cid": cids, "t": torch.cat([b["t"] for b in batches]),
            "prompt": _prompt_keys(view, batches)}


def _prompt_keys(view: ServerView, batches: list[dict]) -> torch.Tensor:
    """One integer per sample for its sent text context; -1 where none is sent or it is the empty prompt's."""
    rows = [c for b in batches for c in (b["context"] if b.get("context") is not None else [None] * len(b["t"]))]
    if all(r is None for r in rows):
        return torch.full((len(rows),), -1)
    empty = view.base.encode_prompts([""])[0].float()
    keys, seen = [], []
    for r in rows:
        if r is None or torch.allclose(r.float(), empty, atol=1e-5):
            keys.append(-1)
            continue
        for i, s in enumerate(seen):
            if torch.equal(r, s):
                keys.append(i)
                break
        else:
            seen.append(r)
            keys.append(len(seen) - 1)
    return torch.tensor(keys)


# ----------------------------------------------------------------------------- distances and thresholds
def distances(est: dict, channel: str) -> torch.Tensor:
    """(N, N) mean squared distance between releases on one channel. ``z0``: less the variance the private
    noise alone adds (s_i^2 + s_j^2), so same-record pairs sit near 0 whatever the noise level."""
    if channel == "hint":
        f = est["fingerprint"].flatten(1).double()
        d = torch.cdist(f, f).pow(2) / f.shape[1]
    else:
        f = est["z0"].flatten(1).double()
        s2 = est["std"].double().pow(2)
        d = torch.cdist(f, f).pow(2) / f.shape[1] - (s2[:, None] + s2[None, :])
    return d


def choose_threshold(same: torch.Tensor, diff: torch.Tensor, cost: float) -> tuple[float | None, dict]:
    """The link threshold (link where distance <= it) minimising miss rate + ``cost`` x false-link rate on
    labelled distances; candidates are the midpoints between consecutive observed values and -inf (link
    nothing: returned as None, the channel does not separate records). Returns it with its rates on the
    labelled pairs."""
    vals = torch.cat([same, diff]).double().sort().values
    cands = torch.cat([torch.tensor([-float("inf")], dtype=torch.float64), (vals[1:] + vals[:-1]) / 2])
    miss = (same.double()[None, :] > cands[:, None]).double().mean(1)
    false = (diff.double()[None, :] <= cands[:, None]).double().mean(1)
    err = miss + cost * false
    best = int(err.argmin())
    stats = {"recall": round(1 - float(miss[best]), 3), "false_links": round(float(false[best]), 4)}
    return (None if best == 0 else float(cands[best])), stats


@torch.no_grad()
def simulated_releases(view: ServerView, n: int, releases: int, iters: int,
                       seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Public auxiliary records through the public client pipeline, ``releases`` times each: the run's defense
    stack (a fresh copy) with the attacker's own randomness and secret, t from the public timestep policy.
    Returns their :func:`release_estimates` and the record id of each release."""
    p = view.base.preset
    stack = DefenseStack(view.cfg.defenses, view.strategy, p.latent_channels * p.latent_size ** 2)
    aux = view.aux(n)
    ae, sched = view.base.autoencoder, view.scheduler
    gen = torch.Generator().manual_seed(seed)
    secret = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    z0 = ae.encode(aux["target"])
    idx = torch.arange(len(z0))
    head = None
    if view.client_part == "head":
        ref = view.batches()[0]["ref"][0] if view.batches() else 0
        head = head_for(view, ref)
    T = sched.config.num_train_timesteps
    t_start = stack.t_start(sched)
    batches = []
    for _ in range(releases):
        eps = torch.randn(z0.shape, generator=gen)
        t = sample_timesteps(len(z0), T, gen, t_start)
        x_t = noisy_latents(sched, z0, eps, t)
        ctx = HookContext(t, sched, -1, gen, secret=secret, z0=z0, idx=idx, noise=eps)
        if head is None:
            branch = lambda x: nograd_control_input(ae, x, aux["condition"])
        else:
            branch = lambda x: control_head(head, x, aux["condition"])
        r = client_release(stack, branch, view.base.unet, x_t, ctx)
        dtype = stack.wire_dtype
        batches.append({"control": r.control.to(dtype).float(), "unet_features": r.unet_features.to(dtype).float(),
                        "t": r.t, "noise": r.target, "context": None, "cid": -1})
    est = release_estimates(view, batches, [head] * len(batches) if head is not None else None, iters, stack)
    return est, idx.repeat(releases)


def pair_ratio(view: ServerView) -> float:
    """Expected different-record pairs per same-record pair among one client's releases: a client holds
    m = num-samples / num-clients records (public) and draws them uniformly, so about m - 1."""
    return max(view.cfg.num_samples / view.cfg.num_clients - 1, 1.0)


def calibrate(view: ServerView, n: int, releases: int, cost: float, iters: int) -> tuple[dict, dict]:
    """Per channel, the threshold chosen on simulated auxiliary releases (see :func:`choose_threshold`), a false
    link costing ``cost`` missed links: ``cost`` x :func:`pair_ratio` in rates. Then the channels whose union
    (a pair linked when any of them links it) has the lowest cost on the same pairs; the others are switched
    off (threshold None): false links add up over channels, so a weak channel next to an exact one only hurts."""
    cost = cost * pair_ratio(view)
    est, rec = simulated_releases(view, n, releases, iters)
    same = rec[:, None] == rec[None, :]
    upper = torch.triu(torch.ones_like(same), diagonal=1)
    thresholds, stats, linked = {}, {}, {}
    for ch in CHANNELS:
        d = distances(est, ch)
        thresholds[ch], stats[ch] = choose_threshold(d[same & upper], d[~same & upper], cost)
        linked[ch] = (d <= thresholds[ch]) if thresholds[ch] is not None else torch.zeros_like(same)
    best = None
    for mask in range(1, 2 ** len(CHANNELS)):
        use = [ch for i, ch in enumerate(CHANNELS) if mask >> i & 1 and thresholds[ch] is not None]
        if not use:
            continue
        any_link = torch.stack([linked[ch] for ch in use]).any(0)
        err = (1 - any_link[same & upper].double().mean()) + cost * any_link[~same & upper].double().mean()
        if best is None or float(err) < best[0]:
            best = (float(err), use)
    used = best[1] if best is not None else []
    for ch in CHANNELS:
        stats[ch]["used"] = ch in used
        if ch not in used:
            thresholds[ch] = None
    return thresholds, stats


# ----------------------------------------------------------------------------- linking and combining
def link(est: dict, thresholds: dict) -> torch.Tensor:
    """Group id per release: complete linkage within each client, a pair linked when any channel's distance
    is within its threshold and the prompts do not contradict (both non-empty and different)."""
    n = len(est["cid"])
    score = torch.full((n, n), float("inf"), dtype=torch.float64)
    for ch in CHANNELS:  # normalised: <= 1 means linked on that channel
        tau = thresholds[ch]
        if tau is None:  # the channel does not separate records here
            continue
        d = distances(est, ch)
        if tau > 0:
            score = torch.minimum(score, d.clamp_min(0) / tau)
        else:  # a threshold at or below 0 (the z0 channel's corrected distances can be negative)
            score = torch.where(d <= tau, torch.zeros_like(score), score)
    pk = est["prompt"]
    contradict = (pk[:, None] != pk[None, :]) & (pk[:, None] >= 0) & (pk[None, :] >= 0)
    other_client = est["cid"][:, None] != est["cid"][None, :]
    score[contradict | other_client] = float("inf")
    score.fill_diagonal_(0)
    groups = list(range(n))
    members = {i: [i] for i in range(n)}
    d = score.clone()  # cluster-to-cluster complete-linkage score, indexed by cluster representative
    active = torch.ones(n, dtype=torch.bool)
    while True:
        masked = d.clone()
        masked[~active] = float("inf")
        masked[:, ~active] = float("inf")
        masked.fill_diagonal_(float("inf"))
        k = int(masked.argmin())
        a, b = divmod(k, n)
        if not masked[a, b] <= 1:
            break
        d[a] = torch.maximum(d[a], d[b])
        d[:, a] = d[a]
        d[a, a] = 0
        active[b] = False
        members[a] += members.pop(b)
    for g, rep in enumerate(sorted(members)):
        for i in members[rep]:
            groups[i] = g
    return torch.tensor(groups)


def combine(est: dict, groups: torch.Tensor) -> dict:
    """Per group: the inverse-variance weighted z0 (releases with std 0, if any, alone), its residual std and the
    mean hint estimate. Noise shared by a group's releases does not average out (one-shot): the fraction that is
    independent is read from the releases' spread around the weighted mean (chi-square: its expectation is k - 1
    when every release's noise is independent, 0 when it is shared)."""
    z0, std = est["z0"], est["std"].double()
    out_z, out_s = torch.empty_like(z0), torch.empty(len(z0))
    out_h = None if est["e_hint"] is None else torch.empty_like(est["e_hint"])
    for g in groups.unique().tolist():
        m = (groups == g).nonzero().flatten()
        s, zs = std[m], z0[m].double()
        exact = s == 0
        w = exact.double() if exact.any() else 1 / s.pow(2)
        w = w / w.sum()
        z = (w.view(-1, 1, 1, 1) * zs).sum(0)
        if exact.any() or len(m) == 1:
            var = float(s.min().pow(2))
        else:
            q = float(((zs - z).pow(2).mean(dim=(1, 2, 3)) / s.pow(2)).sum())
            indep = min(max(q / (len(m) - 1), 0.0), 1.0)
            var = indep / float((1 / s.pow(2)).sum()) + (1 - indep) * float((w * s).sum()) ** 2
        out_z[m] = z.float()
        out_s[m] = var ** 0.5
        if out_h is not None:
            out_h[m] = est["e_hint"][m].mean(0)
    return {"z0": out_z, "std": out_s, "e_hint": out_h}


def client_heads(view: ServerView, batches: list[dict]) -> list | None:
    """A head client's head per batch as the server knows it (attacks.inverse_net.head_for); None for a frozen
    client."""
    if view.client_part != "head":
        return None
    relayed, returned = vanilla_heads(view), returned_heads(view)
    return [head_for(view, b["ref"][0], relayed, returned) for b in batches]


def linked_estimates(view: ServerView, p: dict) -> dict:
    """The whole attack short of decoding: per kept sample its refs, single-release estimates, group and
    group estimates, with the calibration (thresholds and their simulated recall / false-link rates)."""
    batches = view.batches()
    est = release_estimates(view, batches, client_heads(view, batches), p["iters"])
    thresholds, stats = calibrate(view, p["aux"], p["aux-releases"], p["false-link-cost"], p["iters"])
    groups = link(est, thresholds)
    refs = [(b["ref"][0], b["ref"][1], j) for b in batches for j in range(b["control"].shape[0])]
    return {"refs": refs, "single": est, "groups": groups, "combined": combine(est, groups),
            "thresholds": thresholds, "calibration": stats}


@register
class MultiReleaseAttack(Attack):
    """Link the releases of each private record (hint fingerprint, z0 estimates), combine them, decode."""

    name = "multi-release"
    needs = ("sent-features", "noise-target", "white-box-client")
    client_parts = ("frozen", "head")
    why_not = "FedAvg sends no per-step features or noise targets"
    targets = ("image", "hint")
    params: ClassVar[dict] = {"aux": 32, "aux-releases": 2, "false-link-cost": 2.0, "iters": 300, "max-samples": 64}
    threat_model = ("passive server that receives eps and t, knows the public client parts and defenses, and links "
                    "the repeated releases of a record within a client before inverting them")

    def validate(self) -> None:
        if self.p["aux"] < 2 or self.p["aux-releases"] < 2 or self.p["false-link-cost"] <= 0:
            raise ValueError(f"multi-release: need aux >= 2, aux-releases >= 2, false-link-cost > 0; got {self.p}")

    @torch.no_grad()
    def run(self, view: ServerView) -> Reconstruction:
        r = linked_estimates(view, self.p)
        ae, n = view.base.autoencoder, self.p["max-samples"]
        comb, groups = r["combined"], r["groups"]
        images = ae.decode(comb["z0"][:n]).clamp(-1, 1)
        hints = None if comb["e_hint"] is None else signed_to_hint(ae.decode(comb["e_hint"][:n]))
        sizes = torch.bincount(groups).double()
        info = {"groups": len(sizes), "mean_group_size": round(float(sizes.mean()), 3),
                "max_group_size": int(sizes.max()), "linked_releases": int((sizes[groups] > 1).sum()),
                "thresholds": {k: None if v is None else float(f"{v:.4g}") for k, v in r["thresholds"].items()},
                "calibration": r["calibration"],
                "residual_std_single_median": round(float(r["single"]["std"].median()), 4),
                "residual_std_combined_median": round(float(comb["std"].median()), 4)}
        return Reconstruction(r["refs"][:n], images, hints, info=info)
