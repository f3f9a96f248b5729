"""The autoencoder slot: what maps images to the latent space the UNet denoises.

SD1.5 uses an ``AutoencoderKL`` (8x downsampling, 4 latent channels, scaling factor
0.18215). The tiny preset denoises 32x32 pixels directly, so its autoencoder is
``IdentityAutoencoder``: a documented, parameter-free stand-in with the same
``encode``/``decode`` interface. Every scheme calls the slot in the same place, so the
code path is identical at both scales; only the tiny preset's "latent" *is* the image.

Threat-model note: with the identity stand-in, whatever reveals the latent reveals the
image exactly; at SD scale the server would also need the public VAE decoder, which it
has. Attacks (later issues) therefore treat the decoder as public knowledge.
"""
from __future__ import annotations

import torch
from torch import nn


class IdentityAutoencoder(nn.Module):
    """Parameter-free stand-in: ``encode(x) = x``, ``decode(z) = z`` (images in [-1, 1])."""

    scaling_factor = 1.0
    downsample = 1
    deterministic = True  # encode is a function of the image: clients may cache it (sim.core.encodings)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


class KLAutoencoder(nn.Module):
    """Wraps diffusers' ``AutoencoderKL``; encode returns the scaled posterior mean."""

    downsample = 8
    deterministic = True  # the posterior mean, never a sample: clients may cache it (sim.core.encodings)

    def __init__(self, vae):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mean * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample


def encode_hint(autoencoder: nn.Module, hint: torch.Tensor) -> torch.Tensor:
    """The latent of a hint in [0, 1]: ``E(2 hint - 1)`` (the no-gradient-return client's control input
    is this plus x_t)."""
    return autoencoder.encode(hint * 2 - 1)
