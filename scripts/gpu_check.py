"""GPU check: SD1.5 shapes with random weights, a few training steps per scheme, timed per side.

What it does: builds the SD1.5 UNet, ControlNet and VAE from the preset's configuration
(random weights, nothing downloaded) on one device, then per scheme runs ``--steps`` timed
training steps (after one warm-up) of each side with the very functions ``splitcontrol
cost`` traces (``trace_client`` / ``trace_server`` of strategies/<name>.py, on real tensors)
plus an AdamW step of what each side trains; and a bare diffusers ControlNet step (ControlNet
forward, UNet with its residuals, MSE, backward, AdamW: train_controlnet.py's step on cached
latents). Prints one JSON: step seconds and peak memory per side, the ratio of a scheme's
client + server step to the bare step, and the one-time VAE encoding of a batch (clients cache
it, sim/core/encodings.py). Text context is random (the text encoders cache per prompt).

What it needs: a CUDA device (``--device cuda``, the default), or ``--device cpu`` with a
tiny size for a test (``--preset sd15-mini --size 64``). Compute runs under autocast
(``--dtype bf16`` by default on CUDA; weights stay fp32). Meant to finish within 5 minutes on
one modern GPU at the defaults (512 px, batch 2, 3 steps). Exit 2 with a message when the
device is missing or the size is not tiny on a CPU.

    python scripts/gpu_check.py                      # CUDA, SD1.5 at 512 px
    python scripts/gpu_check.py --device cpu --preset sd15-mini --size 64 --steps 1
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch
import torch.nn.functional as F

from sim.commands.cost import MetaModels
from sim.core.autoencoder import encode_hint
from sim.core.cuts import resolve
from sim.core.models import build_autoencoder, build_controlnet, build_unet, get_preset
from strategies import SCHEMES, get_strategy

CPU_MAX_SIZE = 128
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (tests, with a tiny --size)")
    ap.add_argument("--preset", default="sd15")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per scheme after one warm-up (0: the warm-up only)")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="autocast dtype (default bf16 on CUDA, fp32 on CPU)")
    return ap.parse_args(argv)


def fail(msg: str) -> int:
    print(f"gpu_check: error: {msg}", file=sys.stderr)
    return 2


class Side:
    """Times one side's steps and its peak memory (CUDA: max allocated; CPU: not measured)."""

    def __init__(self, device: torch.device):
        self.device, self.times, self.peak = device, [], 0

    @contextlib.contextmanager
    def step(self):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
        self.times.append(time.perf_counter() - t0)

    def result(self) -> dict:
        timed = self.times[1:] or self.times  # the first is the warm-up
        return {"step_s": round(sum(timed) / len(timed), 4),
                "peak_mb": round(self.peak / 2**20, 1) if self.device.type == "cuda" else None}


def trainable(models: MetaModels, names) -> list:
    params = []
    for name in names:
        try:
            params += list(resolve(name, **models.named()).parameters())
        except AttributeError:  # a module this model lacks (e.g. SD1.5's add_embedding)
            continue
    return params


def main(argv=None) -> int:
    a = parse(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return fail("no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, or "
                    f"--device cpu --preset sd15-mini --size 64 for a test")
    if device.type == "cpu" and a.size > CPU_MAX_SIZE:
        return fail(f"--device cpu runs only tiny sizes (--size <= {CPU_MAX_SIZE}, e.g. --preset sd15-mini --size 64); "
                    f"got --size {a.size}")
    if a.steps < 0 or a.batch < 1:
        return fail(f"--steps must be >= 0 and --batch >= 1; got {a.steps}, {a.batch}")
    if device.type not in ("cuda", "cpu"):
        return fail(f"--device {a.device!r}: use cuda or cpu")
    dtype = DTYPES[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    t_start = time.perf_counter()
    p = get_preset(a.preset).replace(image_size=a.size)
    unet = build_unet(p, device=str(device))
    controlnet = build_controlnet(unet, p)
    ae = build_autoencoder(p, device=str(device))
    for m in (unet, controlnet, ae):
        m.to(device).requires_grad_(False)
    models = MetaModels(p, ae, None, unet, controlnet)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext)
    B, lat = a.batch, (a.batch, p.latent_channels, p.latent_size, p.latent_size)
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(B, 3, a.size, a.size, device=device, generator=g) * 2 - 1
    hint = torch.rand(B, 3, a.size, a.size, device=device, generator=g)
    context = torch.randn(B, p.max_tokens, p.cross_attention_dim, device=device, generator=g)
    noise = torch.randn(lat, device=device, generator=g)
    t = torch.randint(0, p.num_train_timesteps, (B,), device=device, generator=g)

    enc = Side(device)  # the one-time encoding of a batch (target + hint), as a client caches it
    for _ in range(a.steps + 1):
        with enc.step(), torch.no_grad(), autocast():
            z0, hint_latent = ae.encode(images).float(), encode_hint(ae, hint).float()
    x_t = z0 * 0.5 + noise * 0.5
    batch = dict(x_t=x_t, t=t, context=context, hint=hint, noise=noise, hint_latent=hint_latent)

    bare = Side(device)  # diffusers' ControlNet training step on cached latents
    controlnet.requires_grad_(True)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
    for _ in range(a.steps + 1):
        with bare.step():
            with autocast():
                down, mid = controlnet(x_t, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
                eps = unet(x_t, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid).sample
                loss = F.mse_loss(eps.float(), noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    controlnet.requires_grad_(False)
    del opt
    bare_s = bare.result()

    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "preset": p.name, "size": a.size, "latent": list(lat[1:]), "batch": B, "steps": a.steps,
           "autocast": str(dtype).removeprefix("torch."), "torch": torch.__version__,
           "bare_diffusers_step": bare_s, "encode_once_per_batch": enc.result(), "schemes": {}}
    for scheme in SCHEMES:
        strategy = get_strategy(scheme)
        cut = strategy.cut
        client_params, server_params = trainable(models, cut.client_trainable), trainable(models, cut.server_trainable)
        for q in client_params + server_params:
            q.requires_grad_(True)
        opts = [torch.optim.AdamW(ps, lr=1e-5) if ps else None for ps in (client_params, server_params)]
        client, server = Side(device), Side(device)
        for _ in range(a.steps + 1):
            with client.step():
                with autocast():
                    step = strategy.trace_client(models, batch, lambda: 0)
                if opts[0] is not None:
                    opts[0].step()
                    opts[0].zero_grad(set_to_none=True)
            if cut.up:
                up = {k: v.detach() for k, v in step.up.items()}
                with server.step():
                    with autocast():
                        strategy.trace_server(models, up, lambda: 0)
                    opts[1].step()
                    opts[1].zero_grad(set_to_none=True)
            del step
        for q in client_params + server_params:
            q.requires_grad_(False)
            q.grad = None
        row = {"client": client.result(), "server": server.result() if cut.up else None}
        total = row["client"]["step_s"] + (row["server"]["step_s"] if row["server"] else 0)
        row["ratio_to_bare"] = round(total / bare_s["step_s"], 3)
        out["schemes"][scheme] = row
        del opts
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
