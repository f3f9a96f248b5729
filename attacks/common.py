"""Helpers several attacks share: exact inversion of the public first conv, undoing public transforms."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sim.core.diffusion import clean_latents


@torch.no_grad()
def invert_conv(conv: torch.nn.Conv2d, y: torch.Tensor, iters: int = 300, tol: float = 1e-10) -> torch.Tensor:
    """Least-squares solution x of conv(x) = y (conjugate gradient on the normal equations).

    The UNet's ``conv_in`` maps C latent channels to many more (3 -> 32 tiny, 4 -> 320 SD),
    so it is injective and well conditioned: CG converges to the exact x in a few dozen
    iterations. Only public weights are used.
    """
    w, b = conv.weight.double(), conv.bias.double() if conv.bias is not None else None
    pad, stride = conv.padding, conv.stride
    y = y.double() - (b.view(1, -1, 1, 1) if b is not None else 0)
    A = lambda x: F.conv2d(x, w, padding=pad, stride=stride)  # noqa: E731
    At = lambda r: F.conv_transpose2d(r, w, padding=pad, stride=stride)  # noqa: E731
    rhs = At(y)
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(dim=(1, 2, 3), keepdim=True)
    for _ in range(iters):
        Ap = At(A(p))
        alpha = rs / (p * Ap).sum(dim=(1, 2, 3), keepdim=True).clamp_min(1e-300)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = (r * r).sum(dim=(1, 2, 3), keepdim=True)
        if float(rs_new.max()) < tol:
            break
        p = r + rs_new / rs.clamp_min(1e-300) * p
        rs = rs_new
    return x.float()


def denoise_latent(x_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scheduler) -> torch.Tensor:
    """z0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): the forward process solved for z0."""
    return clean_latents(scheduler, x_t, noise, t)


def fit_on_stream(net: torch.nn.Module, sample, loss_fn, steps: int, batch: int, lr: float):
    """Train ``net`` on a simulated stream: ``sample(batch)`` gives (inputs, targets), ``loss_fn(net, x, y)`` the
    loss; Adam with a one-cycle schedule. Returns the net in eval mode and its first / final (mean of the
    last tenth) training losses."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=0.1)
    losses = []
    net.train()
    for _ in range(steps):
        x, y = sample(batch)
        loss = loss_fn(net, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    net.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return net, {"train_loss_first": round(losses[0], 4) if losses else None,
                 "train_loss_last": round(sum(tail) / len(tail), 4) if tail else None}


def signed_to_hint(images: torch.Tensor) -> torch.Tensor:
    """An image in [-1, 1] as a hint in [0, 1]."""
    return ((images + 1) / 2).clamp(0, 1)
