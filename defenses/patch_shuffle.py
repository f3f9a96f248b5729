"""Patch shuffling of the sent control features (a baseline the paper compared with).

The control features (C, H, W per sample) are cut into non-overlapping ``patch`` x
``patch`` spatial patches (all channels together), and the patches are permuted with a
fresh permutation per sample from the client-private generator. H and W must be
multiples of ``patch``. Values and within-patch structure are kept (the multiset of
values is unchanged); only where each patch sits is hidden.

What it breaks: the ControlNet relies on the spatial correspondence between the hint
(and x_t) and the UNet's features: its residuals are added position by position. With
shuffled control features the ControlNet can only learn position-free statistics of the
hint, so spatial control (e.g. the outline -> filled-circle task) should degrade sharply;
the measured effect belongs in the experiment's results. At the tiny preset's 32x32
features with patch=4 there are 64 patches; a permutation of 64 is no formal protection
(patches can be re-assembled by matching their edges, as jigsaw solvers do).

Hook: feature (control). Schemes: every split scheme (those whose clients offer the hook). Applied at inference too (train/test
consistency: the ControlNet was trained on shuffled features).
Threat model: hides the global layout from an honest-but-curious server; no formal
guarantee; local content (colours, textures inside a patch) passes unchanged.
"""
from __future__ import annotations

import torch

from .base import Defense, HookContext, register


def shuffle_patches(x: torch.Tensor, patch: int, gen: torch.Generator) -> torch.Tensor:
    """Permute the ``patch`` x ``patch`` spatial patches of each sample of ``x`` (B, C, H, W)."""
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"defense 'patch-shuffle': feature size {h}x{w} is not a multiple of patch={patch}")
    gh, gw = h // patch, w // patch
    tiles = x.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c, patch, patch)
    perm = torch.stack([torch.randperm(gh * gw, generator=gen, device=gen.device) for _ in range(b)]).to(x.device)
    tiles = torch.gather(tiles, 1, perm.view(b, -1, 1, 1, 1).expand_as(tiles))
    return tiles.reshape(b, gh, gw, c, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@register
class PatchShuffle(Defense):
    """Shuffle the patch x patch spatial patches of the control features, per sample."""

    name = "patch-shuffle"
    hooks = ("feature",)
    why_not = "FedAvg sends weights, not features"
    params = {"patch": 4}
    at_inference = True
    threat_model = "hides the spatial layout only; patches can be re-assembled; no formal guarantee"

    def validate(self) -> None:
        if self.p["patch"] < 1:
            raise ValueError(f"defense 'patch-shuffle': patch must be >= 1, got {self.p['patch']}")

    def feature(self, name: str, x: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        return shuffle_patches(x, self.p["patch"], ctx.gen) if name == "control" else x
