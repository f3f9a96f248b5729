"""Prompt from image: reconstruct the private image with an image attack, then name its prompt with a
diffusion classifier built from the public base model.

Needs what the inner image attack needs (``via``, default ``noise-target``: the sent features,
the noise target and t, the public client parts) and public auxiliary data for the candidate
prompts; no text on the wire. So it applies under ``prompt-local`` too, where
prompt-inference is N/A: keeping the prompt home hides the text, not what the image implies.
Passive, honest-but-curious server.

1. Run the inner attack (:func:`attacks.base.make_attack` of ``via``; its own parameters after
   a colon, separated by ``;``), which returns reconstructed images and their refs.
2. Candidates: the distinct non-empty prompts of the auxiliary data (Fill50K: the 56 colour
   pairs), so chance is 1 / #candidates.
3. Diffusion classifier (Li et al. 2023, "Your diffusion model is secretly a zero-shot
   classifier"): re-noise each reconstruction with a few fixed (t, noise) draws and score every
   candidate by the base UNet's mean epsilon-prediction error with that prompt; the lowest wins.
   The same draws serve every candidate (a paired comparison). To stay fast, one screening
   draw (``screen-t``) scores all candidates in one batch and only the ``keep`` best go on to
   the ``t-count`` further draws (evenly spread over the schedule), again in one batch.
The base model only (no server-trained ControlNet): how well this works is how well the
public base model ties prompts to images (the tiny base names the colours 81-84% of the time).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .base import Attack, Reconstruction, ServerView, make_attack, register

ATTACK_SEED = 8_191  # the fixed (t, noise) draws


@torch.no_grad()
def epsilon_errors(unet, scheduler, z0: torch.Tensor, ts: torch.Tensor, noise: torch.Tensor,
                   emb: torch.Tensor) -> torch.Tensor:
    """Mean squared epsilon-prediction error of ``unet`` on z0 (one latent) re-noised with each draw
    (ts[k], noise[k]) under each prompt embedding ``emb[p]``, in one batch: (K, P)."""
    K, P = len(ts), emb.shape[0]
    x = scheduler.add_noise(z0.expand(K, -1, -1, -1), noise, ts)
    x = x.repeat_interleave(P, dim=0)
    t = ts.repeat_interleave(P)
    out = unet(x, t, encoder_hidden_states=emb.repeat(K, 1, 1)).sample
    return (out - noise.repeat_interleave(P, dim=0)).pow(2).flatten(1).mean(1).view(K, P)


@torch.no_grad()
def diffusion_classify(base, scheduler, images: torch.Tensor, emb: torch.Tensor, screen_t: int, keep: int,
                       t_count: int, seed: int = ATTACK_SEED) -> tuple[list[int], torch.Tensor]:
    """The candidate index with the lowest mean epsilon error for each image ([-1, 1]); also the errors
    (N, P) over the draws each candidate was scored on (inf for candidates screened out)."""
    T = scheduler.config.num_train_timesteps
    shape = (base.preset.latent_channels, base.preset.latent_size, base.preset.latent_size)
    gen = torch.Generator().manual_seed(seed)
    ts = torch.tensor([screen_t] + [int((k + 0.5) * T / t_count) for k in range(t_count)], dtype=torch.int64)
    noise = torch.randn(len(ts), *shape, generator=gen)
    P = emb.shape[0]
    keep = min(keep, P)
    guesses, scores = [], torch.full((len(images), P), float("inf"))
    for i, img in enumerate(images):
        z0 = base.autoencoder.encode(img[None].float())
        first = epsilon_errors(base.unet, scheduler, z0, ts[:1], noise[:1], emb)[0]
        top = first.argsort()[:keep]
        if len(ts) > 1 and keep > 1:
            rest = epsilon_errors(base.unet, scheduler, z0, ts[1:], noise[1:], emb[top])
            err = (first[top] + rest.sum(0)) / len(ts)
        else:
            err = first[top]
        scores[i, top] = err
        guesses.append(int(top[err.argmin()]))
    return guesses, scores


@register
class PromptFromImage(Attack):
    """Reconstruct the image with an inner attack, then pick the candidate prompt the public base model fits best."""

    name = "prompt-from-image"
    prompt_of = "record"  # the image shows the record's colours whatever prompt dropout sent
    needs = ("sent-features", "noise-target", "white-box-client", "aux-data")
    client_parts = ("frozen", "head")
    why_not = "FedAvg sends no per-step features (no image to reconstruct from them)"
    targets = ("prompt",)
    params: ClassVar[dict] = {"via": "noise-target", "aux": 1024, "screen-t": 100, "keep": 8, "t-count": 4,
                              "max-samples": 32}
    threat_model = ("passive server that reconstructs the image (inner attack) and classifies it among candidate "
                    "prompts with the public base model; needs no text on the wire")

    def validate(self) -> None:
        self.inner = make_attack(self.p["via"].replace(";", ","))
        if "image" not in self.inner.targets:
            raise ValueError(f"{self.name}: via={self.p['via']!r} reconstructs {list(self.inner.targets)}, not images")
        if self.inner.name == self.name:
            raise ValueError(f"{self.name}: via cannot be {self.name} itself")
        if self.p["keep"] < 1 or self.p["t-count"] < 0 or self.p["max-samples"] < 1:
            raise ValueError(f"{self.name}: need keep >= 1, t-count >= 0, max-samples >= 1; got {self.p}")
        # what this instance needs is its inner attack's needs plus the candidates (aux data) and the base model
        self.needs = tuple(dict.fromkeys((*self.inner.needs, "white-box-client", "aux-data")))
        self.client_parts = tuple(c for c in type(self).client_parts if c in self.inner.client_parts)

    def not_applicable(self, view: ServerView) -> str | None:
        return super().not_applicable(view) or self.inner.not_applicable(view)

    def run(self, view: ServerView) -> Reconstruction:
        p = self.p
        rec = self.inner.run(view)
        candidates = sorted(set(view.aux(p["aux"])["prompt"]) - {""})
        n = min(p["max-samples"], len(rec.refs)) if rec.images is not None and candidates else 0
        images = rec.images[:n] if n else torch.empty(0)
        if len(candidates) > 1:
            emb = view.base.encode_prompts(candidates)
            guesses, _ = diffusion_classify(view.base, view.scheduler, images, emb, p["screen-t"], p["keep"],
                                            p["t-count"])
        else:  # one candidate (faces: "a photo of a face"): nothing to classify
            guesses = [0] * n
        info = {"via": repr(self.inner), "candidates": candidates, "candidate_count": len(candidates),
                "draws": 1 + p["t-count"], "via_info": {k: v for k, v in rec.info.items() if k != "messages"}}
        if "messages" in rec.info:  # an active inner attack's own session: its refs point there
            info["messages"] = rec.info["messages"]
        return Reconstruction(rec.refs[:n], prompts=[candidates[g] for g in guesses], info=info)
