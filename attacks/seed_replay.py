"""Seed replay: regenerate the clients' "private" noise from what the server holds, subtract it, solve for z0.

A defense's noise protects only while its seed is secret. This attack plays the server
that tries: for each candidate client seed it rebuilds every client's private generator
(``strategies.base.private_generator``: the derivation is public, Kerckhoffs; only the
seed is not), replays the defense stack's draws in the order the client made them (one
batch after another, per client, using the public message statistics to skip batches it
did not keep), and subtracts what it regenerated: latent-dp's noise on x_t (at the batch
timestep the defense's public ``source_timestep`` recovers), additive feature noise (``noise``, ``local-dp``'s Gaussian term) and fp16's
fixed per-client offset (from the client's secret). Then, as ``noise-target``: solve the
public ``conv_in`` for x_t, remove the sent noise target (the defense's public
``estimate_z0``), decode the image; for a frozen
client (nograd) also undo symsigmoid and subtract x_t from the control branch: E(hint).

Candidates: ``client-seed`` when given (a test hands it the real one, to show what a leaked
seed costs), else every integer the public config holds (``seed``, ``eval-seed``) and the
small defaults 0 and 1: the seeds a server can guess from what it knows. The candidate
whose recovered latents are smallest (regenerating the wrong noise adds it twice instead
of removing it) is kept. With the trust boundary in place (``client-seed`` client-side,
drawn with 63 bits of entropy) no candidate is right and the result is noise.

Needs: sent features, the noise target and t, public white-box client parts. Passive.
Assumes additive latent and feature noise; other randomised transforms (patch shuffling,
mixup) are replayed to keep the generator in step but not undone; per-record draws
(one-shot's, keyed by record ids the server does not hold) are not regenerated.
"""
from __future__ import annotations

import torch

from defenses import HookContext, Latents
from defenses.symsigmoid import inverse
from strategies.base import client_secret, private_generator

from .base import Attack, Reconstruction, ServerView, register
from .common import invert_conv, signed_to_hint


@register
class SeedReplayAttack(Attack):
    """Regenerate the clients' private noise from guessed seeds, subtract it, then solve for z0 (and E(hint))."""

    name = "seed-replay"
    needs = ("sent-features", "noise-target", "white-box-client")
    client_parts = ("frozen", "head")
    why_not = "FedAvg sends no per-step features or noise targets"
    targets = ("image", "hint")
    params = {"client-seed": -1, "max-samples": 64, "iters": 300}
    threat_model = ("passive server that regenerates any private draw whose seed it can guess from public "
                    "knowledge; the project's boundary keeps client-seed out of that knowledge")

    def candidates(self, view: ServerView) -> list[int]:
        if self.p["client-seed"] >= 0:
            return [self.p["client-seed"]]
        return sorted({int(view.cfg.seed), int(view.cfg.eval_seed), 0, 1})

    # ------------------------------------------------------------------ regenerating the draws
    def regenerated(self, view: ServerView, seed: int, batches: list[dict]) -> dict[tuple, dict]:
        """Per kept batch ``ref``: the additive terms the client's private generator put on each branch,
        as candidate ``seed`` would have drawn them (latent noise; feature terms in hook order). Batches
        the server did not keep are drawn too (shapes as the kept ones: the batch size is public), so
        the generators stay in step; the message statistics say how many batches each message carried."""
        stack, sched = view.defenses, view.scheduler
        kept = {b["ref"]: b for b in batches}
        template = batches[0]
        index_of = {m["stat"]["index"]: i for i, m in enumerate(view.messages)}
        last = max((view.messages[r[0]]["stat"]["index"] for r in kept), default=-1)
        gens, out = {}, {}
        per_record = any(d.per_record for d in stack.with_hook("latent"))  # keyed by record ids: not replayed
        for stat in sorted(view.history, key=lambda s: s["index"]):
            if stat["index"] > last:
                break
            cid = stat["client"]
            gen = gens.setdefault(cid, private_generator(seed, cid))
            secret = client_secret(seed, cid, stream=1)
            i = index_of.get(stat["index"])
            for k in range(int(stat["num_steps"])):
                b = kept.get((i, k), template)
                zeros = torch.zeros(b["noise"].shape)
                ctx = HookContext(stack.source_timestep(b["t"], b["noise"], sched), sched, cid, gen, secret=secret,
                                  noise=zeros)
                lat = stack.latent(zeros, ctx) if not per_record else Latents(zeros, zeros)
                n_unet, n_control = lat.unet, lat.control
                control = [(d, d.feature("control", torch.zeros(b["control"].shape), ctx))
                           for d in stack.with_hook("feature")]
                unet = [(d, d.feature("unet", torch.zeros(b["unet_features"].shape), ctx))
                        for d in stack.with_hook("feature")]
                if (i, k) in kept:
                    out[(i, k)] = {"latent": (n_unet, n_control), "control": control, "unet": unet}
        return out

    @staticmethod
    def undo(y: torch.Tensor, terms: list, branch: str, ctx: HookContext) -> torch.Tensor:
        """Undo a branch's feature hooks in reverse: subtract additive terms, invert symsigmoid where it acts
        on this branch (probed on a constant, with a throwaway generator: it is deterministic)."""
        for d, term in reversed(terms):
            y = y - term
            if d.name == "symsigmoid":
                probe = torch.ones(1, 1, 1, 1)
                if not torch.equal(d.feature(branch, probe, ctx), probe):
                    y = inverse(y)
        return y

    # ------------------------------------------------------------------ the attack
    @torch.no_grad()
    def run(self, view: ServerView) -> Reconstruction:
        batches = view.batches()[: max(1, self.p["max-samples"])]
        conv, ae = view.base.unet.conv_in, view.base.autoencoder
        probe_ctx = HookContext(torch.zeros(1, dtype=torch.int64), view.scheduler, -1, torch.Generator(), secret=0)
        best = None
        for seed in self.candidates(view):
            terms = self.regenerated(view, seed, batches)
            xs, z0s = [], []
            for b in batches:
                tb = terms[b["ref"]]
                feats = self.undo(b["unet_features"], tb["unet"], "unet", probe_ctx)
                x_t = invert_conv(conv, feats, self.p["iters"]) - tb["latent"][0]
                xs.append(x_t)
                z0s.append(view.defenses.estimate_z0(x_t, b["t"], b["noise"], view.scheduler)[0])
            size = float(torch.cat(z0s).pow(2).mean())  # the wrong noise doubles instead of cancelling
            if best is None or size < best[0]:
                best = (size, seed, terms, xs, z0s)
        size, seed, terms, xs, z0s = best
        refs, images, hints = [], [], []
        for b, x_t, z0 in zip(batches, xs, z0s):
            images.append(ae.decode(z0).clamp(-1, 1))
            refs += [(b["ref"][0], b["ref"][1], j) for j in range(z0.shape[0])]
            if view.client_part == "frozen":
                tb = terms[b["ref"]]
                e_hint = self.undo(b["control"], tb["control"], "control", probe_ctx) - tb["latent"][1] - x_t
                hints.append(signed_to_hint(ae.decode(e_hint)))
        n = self.p["max-samples"]
        info = {"seed_chosen_from": len(self.candidates(view)), "latent_mean_square": round(size, 4),
                "seed_given": self.p["client-seed"] >= 0}
        return Reconstruction(refs[:n], torch.cat(images)[:n], torch.cat(hints)[:n] if hints else None, info=info)
