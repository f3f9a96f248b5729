"""Prompt inference: recover each sample's prompt from the text context that crosses the wire.

Needs a text-dependent signal in what the clients send (the split schemes' ``context``
field: token-level text-encoder states). The server embeds every candidate prompt with
the public text encoder and picks the nearest (L2) for each sent context; samples
whose context is the public embedding of the empty prompt (prompt dropout) carry no
text and are skipped. Candidates: the distinct prompts of the auxiliary data (for
Fill50K: every colour pair), so chance level is 1 / #candidates.
Passive, honest-but-curious server. With ``prompt-local`` no text leaves the client and
the attack is N/A (nothing to read), which is the defense's claim; FedAvg sends no
per-step text either.
"""
from __future__ import annotations

import torch

from .base import Attack, Reconstruction, ServerView, register


@register
class PromptInference(Attack):
    """Nearest candidate prompt to each sent text context (public text encoder)."""

    name = "prompt-inference"
    needs = ("sent-features", "text-signal", "aux-data")
    client_parts = ("frozen", "head")
    why_not = "FedAvg sends no per-step text context (only weights)"
    targets = ("prompt",)
    params = {"max-samples": 256, "aux": 1024}
    threat_model = "passive server reading the text context on the wire; public text encoder and candidate prompts"

    @torch.no_grad()
    def run(self, view: ServerView) -> Reconstruction:
        candidates = sorted(set(view.aux(self.p["aux"])["prompt"]) - {""})
        emb = view.base.encode_prompts(candidates).flatten(1)  # (P, L*D)
        empty = view.base.encode_prompts([""]).flatten(1)[0]
        refs, guesses = [], []
        for b in view.batches():
            ctx = b["context"].float().flatten(1)
            for j in range(ctx.shape[0]):
                if torch.allclose(ctx[j], empty, atol=1e-5):
                    continue  # prompt dropout: this sample carried no text
                refs.append((b["ref"][0], b["ref"][1], j))
                guesses.append(candidates[int(torch.cdist(ctx[j:j + 1], emb).argmin())])
        n = self.p["max-samples"]
        return Reconstruction(refs[:n], prompts=guesses[:n], info={"candidates": candidates})
